# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Everything installs into .venv. TORCH picks the torch build: on a CPU machine the default takes the
# local CPU wheel; on a GPU machine it takes the CUDA build from the registry.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean cuda-check constraints repro package-check

# Tests and the demo install from pinned versions (constraints/test.txt), so a registry release cannot
# change what CI runs; pyproject's ranges stay loose for users. `make constraints` refreshes the pins.
CONSTRAINTS := constraints/test.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

# The oldest torch and triton that pyproject admits: the suite must pass on them for the lower bounds
# to mean anything (docs/gpu.md records the last run). Not part of CI: torch 2.11 from PyPI is a CUDA
# build of several GB (it runs on the CPU here). The pinned test dependencies come from constraints/test.txt
# with the oldest triton, and a NumPy that triton 3.6's interpreter works with (it converts 1-element arrays
# with int(), which NumPy 2.4 rejects; the compiled kernels do not use NumPy).
TORCH_MIN ?= torch==2.11.0
TRITON_MIN ?= triton==3.6.0
NUMPY_MIN ?= numpy==2.3.5
MIN_VENV := .venv-min
MIN_STAMP := $(MIN_VENV)/.installed

$(MIN_STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q "$(TORCH_MIN)" "$(TRITON_MIN)"
	grep -v -i -E '^(triton|numpy)==' $(CONSTRAINTS) > $(MIN_VENV)/constraints.txt
	$(MIN_VENV)/bin/python -m pip install -q -c $(MIN_VENV)/constraints.txt "$(TORCH_MIN)" "$(TRITON_MIN)" "$(NUMPY_MIN)" \
		-e ".[dev]"
	touch $(MIN_STAMP)

.PHONY: test-min
test-min: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -c "import numpy, torch, triton; print('test-min:', 'torch', torch.__version__, \
		'triton', triton.__version__, 'numpy', numpy.__version__)"
	$(MIN_VENV)/bin/python -m pytest -q tests

# Re-resolves the newest versions that pyproject allows in a scratch venv and pins them (torch stays
# whatever TORCH says). Review the diff, run `make test`, commit.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q --upgrade pip
	.venv-constraints/bin/python -m pip install -q "$(TORCH)"
	.venv-constraints/bin/python -m pip install -q -e ".[dev]"
	( echo "# Pinned versions for make test / make demo / CI. Regenerate with: make constraints"; \
	  .venv-constraints/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|pip|setuptools)==' ) \
	  > $(CONSTRAINTS)
	rm -rf .venv-constraints

install: $(STAMP)

# Lint and format check (ruff, configured in pyproject.toml), then the suite: float64 references, the
# Triton kernels through the interpreter, the CUDA source's logic built for the host, docs and doctests.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/fastcl train --dataset spirograph --method simclr --encoder convnet --train-size 8192 \
		--test-size 1024 --epochs 3 --batch-size 128 --lr 0.5 --eval-every 0 --out runs/demo --overwrite
	$(VENV)/bin/fastcl bench --quick

# The API reference, rendered from the docstrings into site/api/ (open site/api/index.html).
docs: $(STAMP)
	TRITON_INTERPRET=1 $(VENV)/bin/pdoc -o site/api fastcl fastcl.augment fastcl.data fastcl.models fastcl.evaluation

bench: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bench/run_cpu.sh

# nvcc compiles every CUDA kernel for sm_80 and sm_90 with the ptxas report; fails on any spill (no GPU needed).
cuda-check: $(STAMP)
	$(PY) csrc/cuda_check.py

# Builds the sdist and the wheel (python -m build), checks them (twine check, LICENSE, py.typed, no tests in
# the sdist), installs the wheel into a clean venv next to TORCH and calls a loss from it (.ci/package_check.py).
package-check: $(STAMP)
	$(PY) .ci/package_check.py --torch "$(TORCH)"

# Regenerates the committed `fastcl repro --quick` results in docs/repro/ (CPU, minutes per paper).
repro: $(STAMP)
	$(VENV)/bin/fastcl repro all --quick --out docs/repro --doc docs/repro.md

clean:
	rm -rf $(VENV) runs site .pytest_cache dist
