import torch, torch.distributed as dist
import alltoall
from tests.harness.checks import rank_input, assert_same_bytes

def _body(local_size):
    r, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=local_size)
    x = rank_input(r, 3 * p, (5,), torch.float32)
    exp = torch.empty_like(x); dist.all_to_all_single(exp, x)
    for a in ("flat", "hierarchical"):
        assert_same_bytes(comm.all_to_all(x, a), exp, a)
    return comm.topology.describe()

def test_smoke(worlds):
    print(worlds.run(4, _body, 2))
    print(worlds.run(8, _body, 4))
    print(worlds.run(8, _body, 2))
