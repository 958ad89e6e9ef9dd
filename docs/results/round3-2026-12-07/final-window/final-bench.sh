#!/bin/bash
# The final window's acceptance runs, one after another, each alone (exclusive CPU lock).
cd /work/main
out=/work/final-bench
mkdir -p $out
run() {  # name, command...
  local name=$1; shift
  flock /tmp/alltoall-bench.lock bash -c "echo '== $name'; date -u; uptime; top -bn1 | sed -n 7,12p; $*; date -u; ip netns list" > $out/$name.log 2>&1
}
EMU=".venv/bin/python bench/emulated_cluster.py --rate 1gbit --timeout 900"
STEP=".venv/bin/python bench/moe_step.py --issue20 --steps 3 --rounds 4 --warmup 1"
run k4-2x4 "$EMU --nodes 2 --nproc-per-node 4 -- $STEP --k 4 --dispatchers replicate-flat,dedup --table $out/k4-2x4.txt"
run wires-2x4 "$EMU --nodes 2 --nproc-per-node 4 -- $STEP --dispatchers dedup,dedup@fp8/bf16,dedup@bf16/bf16 --table $out/wires-2x4.txt"
run wires-1host-nodes4 "OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 8 bench/moe_step.py --issue20 --local-size 4 --dispatchers dedup,dedup@fp8/bf16,dedup@bf16/bf16 --steps 3 --rounds 4 --warmup 1 --table $out/wires-1host-nodes4.txt"
run wires-2x1 "$EMU --nodes 2 --nproc-per-node 1 -- $STEP --dispatchers dedup,dedup@fp8/bf16,dedup@bf16/bf16 --table $out/wires-2x1.txt"
run wires-1host-2 "OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 bench/moe_step.py --issue20 --local-size 1 --dispatchers dedup,dedup@fp8/bf16,dedup@bf16/bf16 --steps 3 --rounds 4 --warmup 1 --table $out/wires-1host-2.txt"
FLAT=".venv/bin/python -m alltoall.cli.bench --nprocs 8 --transports auto --algorithms flat -b 1K -e 4M -f 16 -n 200 -w 10 -R 1"
MPI=".venv/bin/mpiexec -n 8 .venv/bin/python bench/mpi_alltoall.py --sizes 1K,16K,256K,1M,4M"
run flat-a "$FLAT"
run mpich-a "$MPI"
run flat-b "$FLAT"
run mpich-b "$MPI"
run moe64 "OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 8 bench/moe_step.py --shapes 64x64x64 --modes train --transports auto --dispatchers replicate-flat,replicate-hierarchical,deepspeed --overlap 1 --steps 20 --rounds 10 --table $out/moe64.txt"
echo done > $out/DONE
