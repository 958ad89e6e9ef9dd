# make test   set up .venv, build, run the whole suite (GPU tests skip, saying why)
# make test-gpu  on a machine with an NVIDIA GPU: CUDA build in .venv-gpu, the GPU tests (docs/gpu.md)
# make bench  set up .venv, build, run the benchmark demo
# make test-repeat  the fault and multinode tests REPEAT times under REPEAT_LOAD busy processes
# A second run reuses .venv and rebuilds only when csrc/ or setup.py changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
BUILT  := $(VENV)/.alltoall-built
SOURCES := $(shell find csrc -type f) setup.py

.PHONY: test test-repeat test-gpu bench bench-mpi install lint cuda-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)

$(BUILT): $(BIN)/python $(SOURCES)
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation -e ".[test,bench,mpi,clients]"
	touch $@

install: $(BUILT)

test: $(BUILT)
	$(BIN)/python -m pytest --durations=25

# The hunt for tests that pass by chance (tests/harness/repeat.py): the tests
# with faults, deadlines and several processes, run again and again while
# busy processes take the cores. Failed runs keep their output.
REPEAT      ?= 20
REPEAT_LOAD ?= 2
REPEAT_TESTS ?= tests/distributed/test_shm_faults.py tests/distributed/test_shm_abort.py tests/distributed/test_shm_space.py \
    tests/distributed/test_dispatcher_faults.py tests/distributed/test_teardown.py \
    tests/backend/test_backend_groups.py tests/multinode

test-repeat: $(BUILT)
	$(BIN)/python -m tests.harness.repeat --runs $(REPEAT) --load $(REPEAT_LOAD) -- $(REPEAT_TESTS)

# The default sweep: 8 local ranks as 2 emulated nodes of 4 (TP groups of 2 for
# "coordinated"), every available
# algorithm, 1 KiB to 4 MiB per rank, 100 timed calls in 10 rounds that alternate
# the algorithms. Results go to bench/results/ (git-ignored). bench-mpi runs
# the same sweep under MPICH's mpiexec, which adds mpi4py's Alltoall.
BENCH_OUT  := bench/results
BENCH_SWEEP ?= --local-size 4 --tp 2 --transports auto,c10d -b 1K -e 4M -f 2 -n 100 -w 10 -R 10

bench: $(BUILT)
	@mkdir -p $(BENCH_OUT)
	$(BIN)/alltoall-bench --nprocs 8 $(BENCH_SWEEP) --table $(BENCH_OUT)/alltoall.txt --json $(BENCH_OUT)/alltoall.json \
	    --csv $(BENCH_OUT)/alltoall.csv --plot $(BENCH_OUT)/alltoall.png
	@echo "make bench: table, JSON, CSV and plot in $(BENCH_OUT)/ (alltoall.txt .json .csv .png)"

bench-mpi: $(BUILT)
	@mkdir -p $(BENCH_OUT)
	$(BIN)/mpiexec -n 8 $(BIN)/alltoall-bench $(BENCH_SWEEP) --table $(BENCH_OUT)/alltoall-mpi.txt \
	    --json $(BENCH_OUT)/alltoall-mpi.json --csv $(BENCH_OUT)/alltoall-mpi.csv --plot $(BENCH_OUT)/alltoall-mpi.png
	@echo "make bench-mpi: table, JSON, CSV and plot in $(BENCH_OUT)/ (alltoall-mpi.txt .json .csv .png)"

lint: $(BUILT)
	$(BIN)/ruff check alltoall tests bench examples setup.py

cuda-check:
	.ci/cuda_build_check

# No dependency on .venv: it checks for a GPU before installing anything.
test-gpu:
	.ci/test_gpu

clean:
	rm -rf build *.egg-info alltoall/_C*.so
