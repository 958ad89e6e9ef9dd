#!/bin/bash
uptime; cd /work/main && /work/main/.venv/bin/mpiexec -n 8 /work/main/.venv/bin/python bench/mpi_alltoall.py --sizes 1K,4K,16K,64K,256K,1M,4M
