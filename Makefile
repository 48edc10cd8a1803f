# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Everything installs into .venv. TORCH picks the torch build: on a CPU machine the default takes the
# local CPU wheel; on a GPU machine it takes the CUDA build from the registry.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/fastcl train --dataset spirograph --method simclr --encoder convnet --epochs 2 --train-size 4096 --test-size 1024 --batch-size 256 --out runs/demo
	$(VENV)/bin/fastcl bench --device cpu --loss all --impl torch,naive --sizes 1024,4096 --dim 128 --repeats 3

bench: $(STAMP)
	$(VENV)/bin/fastcl bench --device cpu --loss all --sizes 1024,4096,8192 --dim 128 --json bench/results/cpu.json

clean:
	rm -rf $(VENV) runs .pytest_cache
