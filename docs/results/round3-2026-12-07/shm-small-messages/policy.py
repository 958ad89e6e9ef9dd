"""Wall per call of flat shm exchanges for several wait policies, in one job, rounds alternating."""
import os, sys, time
import torch, torch.distributed as dist
import alltoall
from alltoall.launch import init_distributed

def main():
    pols = [tuple(map(int, p.split(","))) for p in sys.argv[1].split("/")]
    sizes = [int(s) for s in sys.argv[2].split(",")]
    n = int(sys.argv[3]); rounds = int(sys.argv[4])
    init_distributed()
    comms = []
    for s, y in pols:
        os.environ["ALLTOALL_SHM_SPINS"] = str(s); os.environ["ALLTOALL_SHM_YIELDS"] = str(y)
        comms.append(alltoall.Communicator().exchanger("flat"))
    res = {}
    for r in range(rounds):
        for size in sizes:
            x = torch.randn(size // 4)
            for i in range(len(pols)):
                k = (i + r) % len(pols); ex = comms[k]
                for _ in range(20): ex.all_to_all(x)
                dist.barrier()
                t = time.perf_counter()
                for _ in range(n): ex.all_to_all(x)
                dt = torch.tensor([(time.perf_counter() - t) / n], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                res.setdefault((pols[k], size), []).append(dt.item() * 1e6)
    if dist.get_rank() == 0:
        for (p, size), v in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            v = sorted(v)
            print(f"spins,yields={p} size {size}: median {v[len(v)//2]:.1f} us  best {v[0]:.1f}  all {[round(a) for a in v]}", flush=True)
    dist.barrier(); dist.destroy_process_group()
main()
