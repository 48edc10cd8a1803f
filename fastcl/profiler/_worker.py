"""Subprocess entry point: ``python -m fastcl.profiler._worker '<case JSON>'`` prints one JSON result line."""
from __future__ import annotations

import json
import sys

from fastcl.profiler.cases import Case
from fastcl.profiler.measure import measure_in_process

if __name__ == "__main__":
    print(json.dumps(measure_in_process(Case(**json.loads(sys.argv[1])))), flush=True)
