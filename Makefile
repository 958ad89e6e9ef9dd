# make test   set up .venv, build, run the whole suite
# make bench  set up .venv, build, run the benchmark demo
# A second run reuses .venv and rebuilds only when csrc/ or setup.py changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
BUILT  := $(VENV)/.alltoall-built
SOURCES := $(shell find csrc -type f) setup.py

.PHONY: test bench install lint cuda-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)

$(BUILT): $(BIN)/python $(SOURCES)
	$(BIN)/pip install --quiet --no-build-isolation -e ".[test,bench,mpi]"
	touch $@

install: $(BUILT)

test: $(BUILT)
	$(BIN)/python -m pytest

bench: $(BUILT)
	$(BIN)/alltoall-bench --nprocs 8 --local-size 4

lint: $(BUILT)
	$(BIN)/ruff check alltoall tests bench setup.py

cuda-check:
	.ci/cuda_build_check

clean:
	rm -rf build *.egg-info alltoall/_C*.so
