#!/bin/bash
cd /work/main
out=/work/final-bench
run() {
  local name=$1; shift
  flock /tmp/alltoall-bench.lock bash -c "echo '== $name'; date -u; uptime; top -bn1 | sed -n 7,14p; $*; date -u; ip netns list" > $out/$name.log 2>&1
}
run issue20-4x2 ".venv/bin/python bench/emulated_cluster.py --rate 1gbit --timeout 900 --nodes 4 --nproc-per-node 2 -- .venv/bin/python bench/moe_step.py --issue20 --steps 3 --rounds 4 --warmup 1 --max-nodes 2 --table $out/issue20-4x2.txt"
run issue20-4x2-control "OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 8 bench/moe_step.py --issue20 --local-size 2 --max-nodes 2 --steps 3 --rounds 4 --warmup 1 --table $out/issue20-4x2-control.txt"
echo done > $out/DONE3
