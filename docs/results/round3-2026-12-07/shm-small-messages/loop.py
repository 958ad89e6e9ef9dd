"""Time N flat exchanges of SIZE bytes per rank (8 ranks, torchrun)."""
import os, sys, time
import torch, torch.distributed as dist
import alltoall
from alltoall.launch import init_distributed

def main():
    size = int(sys.argv[1]); n = int(sys.argv[2])
    init_distributed()
    comm = alltoall.Communicator()
    ex = comm.exchanger("flat")
    x = torch.randn(size // 4)
    for _ in range(50): ex.all_to_all(x)
    dist.barrier()
    if os.environ.get("LOOP_SIGNAL") and dist.get_rank() == 0:
        open(os.environ["LOOP_SIGNAL"], "w").close()
    t = time.perf_counter(); c = time.thread_time()
    for _ in range(n): ex.all_to_all(x)
    dt = (time.perf_counter() - t) / n; dc = (time.thread_time() - c) / n
    r = torch.tensor([dt, dc], dtype=torch.float64); dist.all_reduce(r, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(f"{alltoall.__file__.split('/alltoall/')[0]} size {size} wall {r[0]*1e6:.1f} us  cpu(max) {r[1]*1e6:.1f} us", flush=True)
    dist.barrier(); dist.destroy_process_group()

main()
