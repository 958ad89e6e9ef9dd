"""Self-launch: ``alltoall-bench --nprocs N`` starts N local copies of itself.

The parent hosts the rendezvous store (as torchrun's agent does), so there is
no race for a free port, and sets the torchrun environment, so the children
take the same ``init_distributed()`` path as under torchrun. On CPUs each
child gets one thread. If a child fails, the others are stopped after a
grace period instead of waiting out their collective timeouts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

SELF_LAUNCH_ENV = "ALLTOALL_BENCH_SELF_LAUNCHED"
GRACE_S = 10.0


def launched_by_self() -> bool:
    return os.environ.get(SELF_LAUNCH_ENV) == "1"


def child_env(rank: int, nprocs: int, port: int, gpus: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nprocs),
        "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        # Every child is a client of the parent's store (torchrun's agent store).
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        SELF_LAUNCH_ENV: "1",
    })
    if gpus == 0:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def self_launch(argv: list[str], nprocs: int, ok_codes: tuple[int, ...]) -> int:
    """Runs ``python -m alltoall.bench argv`` on ``nprocs`` local ranks and
    returns the first failing exit status (codes in ``ok_codes`` other than 0
    are results, not failures: every rank exits with them together)."""
    if nprocs < 1:
        raise ValueError(f"--nprocs must be >= 1, got {nprocs}")
    import torch
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    gpus = torch.cuda.device_count()
    command = [sys.executable, "-m", "alltoall.bench", *argv]
    procs = [subprocess.Popen(command, env=child_env(r, nprocs, store.port, gpus)) for r in range(nprocs)]
    failed_at: float | None = None
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        while any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c is not None and c not in ok_codes]
            if bad and failed_at is None:
                failed_at = time.monotonic()
                rank, code = bad[0]
                print(f"alltoall-bench: rank {rank} exited with status {code}; stopping the other ranks "
                      f"in {GRACE_S:.0f} s", file=sys.stderr)
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                _stop(procs)
                break
            time.sleep(0.1)
    except BaseException:  # Ctrl-C, SIGTERM (as SystemExit), or our own error: no orphaned ranks
        _stop(procs)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        del store
    codes = [p.wait() for p in procs]
    failures = [c for c in codes if c not in ok_codes]
    if failures:
        return failures[0] if failures[0] > 0 else 1
    return max(codes)
