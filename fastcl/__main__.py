"""``python -m fastcl`` is the ``fastcl`` command."""

import sys

from fastcl.cli import main

sys.exit(main())
