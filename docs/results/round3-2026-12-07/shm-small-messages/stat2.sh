#!/bin/bash
# stat2.sh TREE SIZE N: perf stat of the 8 workers for 1 s of the timed loop; per-call counts
TREE=$1; SIZE=$2; N=$3
cd /tmp/smallmsg; rm -f sig
PYTHONPATH=$TREE OMP_NUM_THREADS=1 LOOP_SIGNAL=/tmp/smallmsg/sig /work/main/.venv/bin/torchrun --standalone --nproc-per-node 8 loop.py $SIZE $N > out.txt 2>&1 &
TR=$!
while [ ! -f sig ]; do sleep 0.05; done
PIDS=$(pgrep -d, -f "loop.py $SIZE $N" | sed 's/^[0-9]*,//')
perf stat -x, -e task-clock,context-switches,syscalls:sys_enter_futex,syscalls:sys_enter_sched_yield -p $PIDS -- sleep 1 2> st.txt
wait $TR; W=$(grep -o "wall [0-9.]*" out.txt | cut -d' ' -f2); grep size out.txt
awk -F, -v w=$W '{printf "  %s per call: %.1f\n", $3, $1/(1e6/w)}' st.txt
