"""Worker process: ``python -m fastcl.profiler._worker`` reads a JSON list of cases on stdin and prints one
JSON line ``{"index": i, "result": {...}}`` per case as soon as it is measured (see ``runner.py``)."""

from __future__ import annotations

import json
import sys

from fastcl.profiler.cases import Case
from fastcl.profiler.measure import measure_case

if __name__ == "__main__":
    for index, fields in json.load(sys.stdin):
        print(json.dumps({"index": index, "result": measure_case(Case(**fields))}), flush=True)
