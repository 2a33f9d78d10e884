# Two commands do all set-up on a fresh machine: `make demo` (main job) and `make test` (tests).
# TORCH_SPEC defaults to the CPU wheel so that a CPU-only machine never pulls multi-GB CUDA builds;
# on a GPU machine with torch already in the environment, use `make test VENV_FLAGS=--system-site-packages TORCH_SPEC=`.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test lint bench gpu-check gpu-test gpu-bench gpu-short sm90 figures clean

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

# Quick CPU smoke run of the whole suite into out/ (the record: `make bench BENCH_ARGS=` appends the full
# run to bench/results/results.csv; then `python -m plots.benchmarks` redraws plots and summary).
BENCH_ARGS ?= --quick --csv out/bench/results.csv
bench: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE $(PY) -m bench.suite $(BENCH_ARGS)

# On a CUDA machine whose python3 already has torch and triton. Two parts, each well inside one 10-minute
# device call: every test on the GPU, then the whole benchmark suite (budgeted to ~6 min, skipped shapes
# recorded with the reason) appended to bench/results/results.csv, plots and summary redrawn.
gpu-check: gpu-test gpu-bench

gpu-test:
	python3 -m pytest -q tests

gpu-bench:
	python3 -m bench.suite --time-budget-s 360
	python3 -m plots.benchmarks

# The short GPU check (issue 12): GPU tests at real sizes, compute-sanitizer, side-by-side timings into
# bench/results/results.csv, all inside one 8-minute device call (logs in out/gpu_check).
gpu-short:
	bash bench/gpu_check.sh

# Every kernel compiled for sm_90 as launched, read on paper (no GPU): bench/results/sm90.csv.
sm90: $(VENV)/.installed
	$(PY) -m bench.sm90 --label after

# The convergence studies (paper Fig. 5, its causes, Fig. 7), regenerated into plots/figures/ (~25 min on 2
# cores; Fig. 5's coffee and stereo pairs need scikit-image's photos: pip install -e ".[photos]").
figures: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE $(PY) -m plots.convergence
	OMP_WAIT_POLICY=PASSIVE $(PY) -m plots.fig5_causes
	OMP_WAIT_POLICY=PASSIVE $(PY) -m plots.fig5_causes --features filter-bank-4
	OMP_WAIT_POLICY=PASSIVE $(PY) -m plots.scale_robustness

lint: $(VENV)/.installed
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) out .pytest_cache
