"""Bootstrap: initialise torch.distributed from whichever launcher started
this process (torchrun, mpiexec with mpi4py, or Slurm's srun).

NCCL is chosen when GPUs are visible, gloo otherwise; with GPUs, each process
takes the device of its local rank.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from alltoall.transport import resolve_timeout


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits, and who launched it."""

    launcher: str  # "torchrun", "mpi", "slurm" or "existing"
    rank: int
    world_size: int
    local_rank: int
    backend: str


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def detect_launcher(env: dict[str, str] | None = None) -> str | None:
    """'torchrun', 'mpi', 'slurm' or None, from the environment.

    torchrun wins (it may itself run under srun or mpiexec); an MPI launcher
    wins over Slurm, since srun --mpi and mpiexec inside an allocation set both.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env or "PMIX_RANK" in env:
        return "mpi"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    return None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as 'gpu[003-005,010],cpu1'."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous() -> tuple[int, int, int]:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = local.Get_rank()
    local.Free()
    address = None
    if world.Get_rank() == 0:
        address = (os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname()),
                   os.environ.get("MASTER_PORT") or str(_free_port()))
    addr, port = world.bcast(address, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port
    return world.Get_rank(), world.Get_size(), local_rank


def _slurm_rendezvous(env: dict[str, str]) -> tuple[int, int, int]:
    rank, size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    local_rank = int(env.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in env:
        os.environ["MASTER_ADDR"] = first_slurm_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
    if "MASTER_PORT" not in env:
        # Same on every task of the job, and unlikely to clash with another job.
        os.environ["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return rank, size, local_rank


def init_distributed(backend: str | None = None, timeout: timedelta | float | None = None) -> LaunchInfo:
    """Initialises the default process group from the launcher's environment.

    Args:
        backend: "nccl", "gloo", ...; default NCCL with GPUs, else gloo.
        timeout: the backend's timeout for every collective; default
            ``ALLTOALL_TIMEOUT`` seconds, else 10 minutes.

    Raises:
        RuntimeError: when no launcher is recognised.
    """
    if dist.is_initialized():
        return LaunchInfo("existing", dist.get_rank(), dist.get_world_size(),
                          int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())
    launcher = detect_launcher()
    env = dict(os.environ)
    if launcher == "torchrun":
        rank, size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    elif launcher == "mpi":
        rank, size, local_rank = _mpi_rendezvous()
    elif launcher == "slurm":
        rank, size, local_rank = _slurm_rendezvous(env)
    else:
        raise RuntimeError(
            "no launcher found: run under torchrun, mpiexec (with mpi4py installed) or srun, or call "
            "torch.distributed.init_process_group yourself"
        )
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size,
                            timeout=resolve_timeout(timeout))
    return LaunchInfo(launcher, rank, size, local_rank, backend)
