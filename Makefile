# Two commands do all set-up on a fresh machine: `make demo` (main job) and `make test` (tests).
# TORCH_SPEC defaults to the CPU wheel so that a CPU-only machine never pulls multi-GB CUDA builds;
# on a GPU machine with torch already in the environment, use `make test VENV_FLAGS=--system-site-packages TORCH_SPEC=`.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test lint bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m amsa demo

# PASSIVE: idle OpenMP threads sleep instead of spinning, so a busy machine does not slow the tests ~10x.
test: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m bench.patchmatch --quick
	$(PY) -m bench.deform_conv --quick

# On a CUDA machine whose python3 already has torch and triton: every test on the GPU, then the
# benchmarks (the matcher's Triton-vs-PyTorch check first); results are appended to bench/results/.
gpu-check:
	python3 -m pytest -q tests
	python3 -m bench.patchmatch
	python3 -m bench.patchmatch --data random --size 250 --channels 256
	python3 -m bench.deform_conv

lint: $(VENV)/.installed
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) out .pytest_cache
