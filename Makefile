# Two commands do all set-up on a fresh machine: `make demo` (main job) and `make test` (tests).
# TORCH_SPEC defaults to the CPU wheel so that a CPU-only machine never pulls multi-GB CUDA builds;
# on a GPU machine with torch already in the environment, use `make test VENV_FLAGS=--system-site-packages TORCH_SPEC=`.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m amsa demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m pytest -q bench --benchmark-only

lint: $(VENV)/.installed
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) out .pytest_cache
