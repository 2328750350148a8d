# The two commands of the README. Each sets up its own virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel: an unpinned torch would pull a multi-GB CUDA build. Override on GPU hosts.
TORCH_SPEC ?= torch==2.13.0
DATA ?=
DEMO_ARGS ?=

.PHONY: demo test setup clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e ".[test]"
	if command -v mpicc >/dev/null 2>&1; then $(VENV)/bin/pip install -q "mpi4py>=3.1"; fi
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/megadrp demo $(if $(DATA),--data "$(DATA)") $(DEMO_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=20 tests

clean:
	rm -rf runs/demo
