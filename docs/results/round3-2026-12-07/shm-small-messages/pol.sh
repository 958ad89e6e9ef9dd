#!/bin/bash
TREE=$1; shift
cd /tmp/smallmsg && uptime && PYTHONPATH=$TREE OMP_NUM_THREADS=1 /work/main/.venv/bin/torchrun --standalone --nproc-per-node 8 policy.py "$@" 2>&1 | grep -v "^W1\|OMP_NUM\|\*\*\*\*"; uptime
