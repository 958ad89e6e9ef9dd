#!/bin/bash
# run.sh TREE SIZE N
TREE=$1; SIZE=$2; N=$3
cd /tmp/smallmsg && PYTHONPATH=$TREE OMP_NUM_THREADS=1 /work/main/.venv/bin/torchrun --standalone --nproc-per-node 8 loop.py $SIZE $N 2>&1 | grep -v "^W1\|OMP_NUM\|\*\*\*\*"
