"""Bootstrap: initialise torch.distributed from whichever launcher started
this process (torchrun, mpiexec with mpi4py, or Slurm's srun).

NCCL is chosen when GPUs are visible, gloo otherwise; with GPUs, each process
takes the device of its local rank.

The pure parts (which launcher, the Slurm node list, the rendezvous address)
are separate functions of an environment mapping, so they are tested without
any launcher.
"""

from __future__ import annotations

import fcntl
import importlib.util
import ipaddress
import itertools
import os
import re
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from alltoall.transport import resolve_timeout

# Set by mpiexec/mpirun (Open MPI, MPICH/Hydra, Intel MPI) or by srun --mpi=pmi2/pmix.
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
MPI_MARKER_VARS = (*MPI_SIZE_VARS, "PMIX_RANK", "PMI_RANK")
# srun sets these for every task of a step; an sbatch script (the batch step) has no step id.
SLURM_STEP_VARS = ("SLURM_STEP_ID", "SLURM_STEPID")
SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


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


def mpi4py_available() -> bool:
    return importlib.util.find_spec("mpi4py") is not None


def _is_slurm_step(env: Mapping[str, str]) -> bool:
    return "SLURM_PROCID" in env and "SLURM_NTASKS" in env and any(v in env for v in SLURM_STEP_VARS)


def detect_launcher(env: Mapping[str, str] | None = None, *, has_mpi4py: bool | None = None) -> str | None:
    """'torchrun', 'mpi', 'slurm' or None, from the environment.

    - torchrun wins: it may itself run under srun or mpiexec.
    - An MPI launcher wins over Slurm: mpiexec inside an allocation starts its
      per-node proxies with srun, so every rank inherits a proxy's SLURM_PROCID.
    - Except under ``srun --mpi=...`` without mpi4py, where both describe the
      same tasks (equal sizes): then Slurm's variables are enough.
    - Slurm needs an srun step (SLURM_STEP_ID): an sbatch script itself also
      has SLURM_PROCID=0, and must not take itself for rank 0 of the job.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    slurm = _is_slurm_step(env)
    if any(v in env for v in MPI_MARKER_VARS):
        if has_mpi4py is None:
            has_mpi4py = mpi4py_available()
        mpi_sizes = {env[v] for v in MPI_SIZE_VARS if v in env}
        if not has_mpi4py and slurm and mpi_sizes <= {env["SLURM_NTASKS"]}:
            return "slurm"
        return "mpi"
    return "slurm" if slurm else None


# Slurm ---------------------------------------------------------------------


def _split_top_level(text: str, what: str) -> list[str]:
    """Splits on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in Slurm node list {what!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm node list {what!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm node list {what!r}")
    parts.append(text[start:])
    return parts


def _expand_ranges(body: str, what: str) -> list[str]:
    """'003-005,010' -> ['003', '004', '005', '010']; zero padding follows the low end."""
    out: list[str] = []
    for item in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise ValueError(f"bad range {item!r} in Slurm node list {what!r}")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"range {item!r} runs backwards in Slurm node list {what!r}")
        out.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return out


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Every host of a Slurm host list, in order.

    'gpu[003-005,010],cpu1' -> gpu003, gpu004, gpu005, gpu010, cpu1. Several
    bracket groups in one name ('r[1-2]n[1-2]') give their product.

    Raises:
        ValueError: naming the list, when it cannot be parsed.
    """
    text = nodelist.strip()
    if not text:
        raise ValueError("the Slurm node list is empty")
    hosts: list[str] = []
    for item in _split_top_level(text, nodelist):
        if not item:
            raise ValueError(f"empty host name in Slurm node list {nodelist!r}")
        pieces = re.split(r"\[([^\]]*)\]", item)
        # pieces alternate: literal, range body, literal, ...
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, nodelist) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as 'gpu[003-005,010],cpu1'."""
    return expand_slurm_nodelist(nodelist)[0]


def slurm_master_port(env: Mapping[str, str]) -> int:
    """A port every task of one job step computes alike: from the job and step
    ids, in 20000-31999 (below Linux's ephemeral range), so concurrent steps
    and jobs sharing a node rarely collide."""

    def as_int(name: str) -> int:
        raw = env.get(name, "0")
        return int(raw) if raw.isdigit() else 0

    step = as_int("SLURM_STEP_ID") if "SLURM_STEP_ID" in env else as_int("SLURM_STEPID")
    return 20000 + (as_int("SLURM_JOB_ID") * 17 + step) % 12000


@dataclass(frozen=True)
class SlurmTask:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def slurm_task(env: Mapping[str, str]) -> SlurmTask:
    """This task's place and the rendezvous, from srun's variables. The step's
    node list comes first: a step may use only part of the job's nodes.
    MASTER_ADDR/MASTER_PORT in the environment win."""
    try:
        rank, size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", "0"))
    except (KeyError, ValueError) as error:
        raise ValueError(f"incomplete Slurm environment: {error}") from None
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("Slurm environment without SLURM_STEP_NODELIST, SLURM_JOB_NODELIST or SLURM_NODELIST, "
                             "and no MASTER_ADDR")
        addr = first_slurm_host(nodelist)
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else slurm_master_port(env)
    return SlurmTask(rank, size, local_rank, addr, port)


# MPI -----------------------------------------------------------------------


def interface_ipv4(name: str) -> str | None:
    """The IPv4 address of network interface ``name``, or None."""
    SIOCGIFADDR = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def mpi_master_addr(
    env: Mapping[str, str],
    *,
    single_host: bool,
    hostname: str,
    address_of: Callable[[str], str | None] = interface_ipv4,
) -> str:
    """The address rank 0 publishes for the TCP store.

    MASTER_ADDR when set; else the address of the interface named by
    GLOO_SOCKET_IFNAME or NCCL_SOCKET_IFNAME (the one the backend will use);
    else loopback when every rank shares this host; else the host name, which
    each peer resolves itself (resolving it here may give 127.0.1.1).
    """
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    for var in SOCKET_IFNAME_VARS:
        first = env.get(var, "").split(",")[0].lstrip("=")
        if first and not first.startswith("^"):
            addr = address_of(first)
            if addr and not ipaddress.ip_address(addr).is_loopback:
                return addr
    return "127.0.0.1" if single_host else hostname


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous() -> tuple[int, int, int, int]:
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("launched by an MPI launcher, but mpi4py is not installed: pip install mpi4py "
                           "(or alltoall[mpi])") from None

    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    address = None
    if world.Get_rank() == 0:
        addr = mpi_master_addr(os.environ, single_host=local_size == world.Get_size(), hostname=socket.gethostname())
        address = (addr, os.environ.get("MASTER_PORT") or str(_free_port()))
    addr, port = world.bcast(address, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port
    return world.Get_rank(), world.Get_size(), local_rank, local_size


# Entry point ---------------------------------------------------------------


def init_distributed(backend: str | None = None, timeout: timedelta | float | None = None) -> LaunchInfo:
    """Initialises the default process group from the launcher's environment.

    Sets MASTER_ADDR, MASTER_PORT and LOCAL_RANK (and LOCAL_WORLD_SIZE under
    MPI) for the code that follows, as torchrun would.

    Args:
        backend: "nccl", "gloo", ...; default NCCL with GPUs, else gloo.
        timeout: the backend's timeout for every collective; default
            ``ALLTOALL_TIMEOUT`` seconds, else 10 minutes.

    Raises:
        RuntimeError: when no launcher is recognised, or mpi4py is missing
            under an MPI launcher.
        ValueError: on an incomplete or unparsable Slurm environment.
    """
    if dist.is_initialized():
        return LaunchInfo("existing", dist.get_rank(), dist.get_world_size(),
                          int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())
    launcher = detect_launcher()
    if launcher == "torchrun":
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    elif launcher == "mpi":
        rank, size, local_rank, local_size = _mpi_rendezvous()
        os.environ["LOCAL_WORLD_SIZE"] = str(local_size)
    elif launcher == "slurm":
        task = slurm_task(os.environ)
        rank, size, local_rank = task.rank, task.world_size, task.local_rank
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = task.master_addr, str(task.master_port)
    else:
        raise RuntimeError(
            "no launcher found: run under torchrun, mpiexec (with mpi4py installed) or srun (inside an sbatch "
            "script, start the ranks with srun), or call torch.distributed.init_process_group yourself"
        )
    backend = backend or default_backend()
    # NCCL, or the alltoall backend wrapping it: one device per process.
    if "nccl" in backend or (backend == "alltoall" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    os.environ["LOCAL_RANK"] = str(local_rank)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size,
                            timeout=resolve_timeout(timeout))
    return LaunchInfo(launcher, rank, size, local_rank, backend)
