# Everything a newcomer needs: `make demo` and `make test` create or reuse .venv and install into it.
# Torch goes in first, from TORCH_SPEC: an unpinned torch pulls several GB of CUDA wheels on a CPU
# machine. Elsewhere, e.g.  make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The suite runs in two worker processes, one thread each: the tests are many small tensor ops,
# for which two processes beat one process with two threads on a 2-core machine.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: venv test test-slow demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev,mnist]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) -m slow $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m pyro_storn.demo

# The bench extra (normflows, zuko: timed beside our flows) goes in with torch pinned to the
# build already installed from TORCH_SPEC (a conflict then fails, never pulls another torch; the
# pin needs no index, so a TORCH_SPEC with --index-url cannot hide PyPI from these).
bench: $(STAMP)
	$(PIP) install -q -e ".[dev,mnist,bench]" "torch==$$($(PY) -c 'import torch; print(torch.__version__)')"
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info runs
