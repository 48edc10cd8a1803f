"""``python -m fastcl.profiler`` = ``fastcl bench``."""

import sys

from fastcl.profiler.cli import main

sys.exit(main())
