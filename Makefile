# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv on first use and installs gpukv (editable) with its dev extras.
# GPU users: make TORCH="torch" (or pre-install their CUDA build into .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: demo test perf install
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/gpukv demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

perf: $(VENV)/.installed
	$(PY) perf/run_all.py --preset quick
