#!/bin/bash
cd /work/main
out=/work/final-bench
while [ ! -f $out/DONE ]; do sleep 5; done
run() {
  local name=$1; shift
  flock /tmp/alltoall-bench.lock bash -c "echo '== $name'; date -u; uptime; top -bn1 | sed -n 7,12p; $*; date -u" > $out/$name.log 2>&1
}
for i in 1 2; do
run launcher-torchrun-$i "OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 8 bench/launcher_cpu.py"
run launcher-mpiexec-$i "OMP_NUM_THREADS=1 .venv/bin/mpiexec -n 8 .venv/bin/python bench/launcher_cpu.py"
done
echo done > $out/DONE2
