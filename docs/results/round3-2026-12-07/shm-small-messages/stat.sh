#!/bin/bash
# stat.sh TREE SIZE N : perf stat counts of the whole job
TREE=$1; SIZE=$2; N=$3
cd /tmp/smallmsg && PYTHONPATH=$TREE OMP_NUM_THREADS=1 perf stat -x, -e task-clock,context-switches,syscalls:sys_enter_futex,syscalls:sys_enter_sched_yield,raw_syscalls:sys_enter -- /work/main/.venv/bin/torchrun --standalone --nproc-per-node 8 loop.py $SIZE $N 2>&1 | grep -v "^W1\|OMP_NUM\|\*\*\*\*"
