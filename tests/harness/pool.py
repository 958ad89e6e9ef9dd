"""A pool of persistent rank processes for distributed tests.

Importing torch in 8 fresh processes per test would dominate the suite on 2
cores, so each world size keeps its processes. Every run still gets a fresh
rendezvous (a new FileStore) and a fresh default process group, destroyed
afterwards, so tests neither collide nor share groups.

A run that does not finish within its deadline kills the pool (the next run
starts a new one) and fails naming the ranks that did not answer.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

# The backend's own timeout for every collective in a run: short, so a
# broken test fails in the rank that waits instead of hanging the pool.
COLLECTIVE_TIMEOUT_S = 60.0
RUN_DEADLINE_S = 180.0


class RankFailure(AssertionError):
    """One or more ranks raised; the message holds every rank's traceback."""


def _die_with(parent_pid: int) -> None:
    """Asks the kernel to SIGKILL this process when its parent ends, so a
    test session that is killed leaves no rank processes waiting for jobs."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent ended before the request took effect
        os._exit(1)


def _all_joined(store: Any, world_size: int, timeout_s: float) -> None:
    """Waits until every rank has finished creating the group. Gloo's
    connectFullMesh returns on one side of a pair before the other side has
    finished its handshake, and torch no longer runs a barrier at the end of
    init_process_group: a body that does not communicate could otherwise
    destroy the group under a peer that is still connecting ("Connection
    closed by peer")."""
    if store.add("pool/joined", 1) == world_size:
        store.set("pool/all-joined", b"1")
    store.wait(["pool/all-joined"], timedelta(seconds=timeout_s))


def _worker(rank: int, world_size: int, jobs: mp.Queue, results: mp.Queue, parent_pid: int) -> None:
    _die_with(parent_pid)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    while True:
        job = jobs.get()
        if job is None:
            return
        job_id, fn, args, kwargs, store_path, env, sys_path, timeout_s, backend = job
        sys.path[:] = sys_path
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            store = dist.FileStore(store_path, world_size)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s))
            _all_joined(store, world_size, timeout_s)
            value = fn(*args, **kwargs)
            results.put((job_id, rank, True, value))
        except BaseException:
            results.put((job_id, rank, False, traceback.format_exc()))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class WorldPool:
    """``world_size`` rank processes that run test bodies together."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._jobs: list[Any] = []
        self._results: Any = None
        self._next_job = 0
        self._tmp = tempfile.mkdtemp(prefix=f"alltoall-world{world_size}-")

    def _start(self) -> None:
        self._results = self._ctx.Queue()
        self._jobs = [self._ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            self._ctx.Process(target=_worker, args=(r, self.world_size, self._jobs[r], self._results, os.getpid()),
                              daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        env: dict[str, str] | None = None,
        deadline_s: float = RUN_DEADLINE_S,
        collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
        backend: str = "gloo",
        **kwargs: Any,
    ) -> list[Any]:
        """Runs ``fn(*args, **kwargs)`` on every rank inside a fresh default
        group of ``backend`` and returns the rank-ordered results. ``fn`` must
        be importable (a module-level function); "alltoall" needs its module
        to import alltoall. ``env`` is set before the group is created."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        job_id = self._next_job
        self._next_job += 1
        store_path = os.path.join(self._tmp, f"store-{job_id}")
        job = (job_id, fn, args, kwargs, store_path, dict(env or {}), list(sys.path), collective_timeout_s, backend)
        for q in self._jobs:
            q.put(job)
        values: dict[int, Any] = {}
        errors: dict[int, str] = {}
        end = time.monotonic() + deadline_s
        while len(values) + len(errors) < self.world_size:
            try:
                jid, rank, ok, value = self._results.get(timeout=min(1.0, max(0.1, end - time.monotonic())))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if time.monotonic() < end and not dead:
                    continue
                missing = sorted(set(range(self.world_size)) - set(values) - set(errors))
                reason = f"rank processes {dead} died" if dead else f"did not finish within {deadline_s:.0f} s"
                self.close()
                raise TimeoutError(
                    f"{fn.__name__} on {self.world_size} ranks: ranks {missing} {reason}; the pool was killed"
                    + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                ) from None
            if jid != job_id:
                continue  # a late answer from a killed run
            (values if ok else errors)[rank] = value
        if errors:
            raise RankFailure(
                f"{fn.__name__} failed on ranks {sorted(errors)} of {self.world_size}:"
                + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            )
        return [values[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self._jobs:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs, self._jobs = [], []


class Worlds:
    """One pool per world size, started on first use: the tests' fixture."""

    def __init__(self) -> None:
        self._pools: dict[int, WorldPool] = {}

    def run(self, world_size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        if world_size not in self._pools:
            self._pools[world_size] = WorldPool(world_size)
        return self._pools[world_size].run(fn, *args, **kwargs)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
