#!/bin/bash
# rec2.sh TREE SIZE N OUT: perf record the 8 workers for 3 s of the timed loop
TREE=$1; SIZE=$2; N=$3; OUT=$4
cd /tmp/smallmsg; rm -f sig
PYTHONPATH=$TREE OMP_NUM_THREADS=1 LOOP_SIGNAL=/tmp/smallmsg/sig /work/main/.venv/bin/torchrun --standalone --nproc-per-node 8 loop.py $SIZE $N > out.txt 2>&1 &
TR=$!
while [ ! -f sig ]; do sleep 0.1; done
PIDS=$(pgrep -d, -P $(pgrep -P $TR -f torchrun || echo $TR) python || true)
[ -z "$PIDS" ] && PIDS=$(pgrep -d, -f "loop.py $SIZE")
perf record -F 4000 -g -p $PIDS -o $OUT -- sleep 3 2>&1 | tail -1
wait $TR; grep size out.txt
