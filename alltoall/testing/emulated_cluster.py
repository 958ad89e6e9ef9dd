"""An emulated cluster on one Linux machine (root only): every host is a
network namespace with its own address in 10.231.0.0/16, its own host name
(``unshare --uts``), its own /etc/hosts naming all hosts (bind-mounted in a
private mount namespace) and a tbf rate-limited link to a shared bridge.

It runs any command on every host, usually ``torchrun`` with a static
rendezvous on host 0, and removes namespaces, links and processes on exit,
also after an exception or a timeout::

    with EmulatedCluster(2, rate="1gbit") as cluster:
        results = cluster.run_torchrun(4, [sys.executable, "-m", "my_rank_script"], timeout=120)
        assert all(r.returncode == 0 for r in results)

Processes see ``GLOO_SOCKET_IFNAME=eth0`` and ``NCCL_SOCKET_IFNAME=eth0``:
without them gloo binds to the address its host name resolves to first.
Used by tests/multinode and bench/emulated_cluster.py.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from alltoall.testing import netns

DEFAULT_PORT = 29500
# Inherited launcher state would confuse the processes we start: they get their own.
_DROPPED_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_", "HYDRA_")
_DROPPED_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MPI_LOCALRANKID",
                 "MPI_LOCALNRANKS", "ALLTOALL_HOSTNAME", "ALLTOALL_LOCAL_SIZE"}
# Runs as: sh -c SCRIPT sh HOSTNAME HOSTS_FILE ARGV...
_HOST_SHELL = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
_sequence = itertools.count()


@dataclass(frozen=True)
class Host:
    """One emulated host."""

    index: int
    namespace: str
    hostname: str
    address: str
    interface: str


@dataclass(frozen=True)
class HostResult:
    """How a host's command ended, and where its output went."""

    host: Host
    returncode: int
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


class ClusterTimeout(TimeoutError):
    """Commands still ran at the deadline; they were killed. The message holds every host's log tail."""


def launcher_free_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any launcher's variables (torchrun,
    Slurm, MPI) or alltoall's topology overrides, plus ``extra``: for starting
    a fresh job from inside a test or another job."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_VARS and not k.startswith(_DROPPED_PREFIXES)}
    env.update(extra or {})
    return env


def _raise_exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _unwind_on_sigterm() -> object | None:
    """Makes SIGTERM raise SystemExit in the main thread, so ``close`` runs
    (``with`` blocks and ``finally`` unwind) when a run is terminated, e.g. a
    test session stopped with ``kill``: without it Python dies at once and
    the namespaces' processes run on. Returns the handler to restore, or None
    where nothing was changed (not the main thread, or a handler of the
    caller's own is installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _raise_exit_on_sigterm)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@cache
def unavailable_reason() -> str | None:
    """Why an emulated cluster cannot run on this machine, or None. Probes
    once per process by building and removing a one-host cluster."""
    reason = netns.missing_requirements()
    if reason:
        return reason
    try:
        with EmulatedCluster(1, rate="1gbit") as cluster:
            (result,) = cluster.run(lambda host: ["hostname"], timeout=30)
            out = result.log().strip()
            if result.returncode != 0 or out != cluster.hosts[0].hostname:
                return f"a command inside a namespace failed (exit {result.returncode}): {_tail(out, 5)}"
    except (OSError, netns.NetnsError, subprocess.SubprocessError, TimeoutError) as error:
        return f"cannot build an emulated host: {error}"
    return None


class EmulatedCluster:
    """``num_hosts`` emulated hosts joined by a bridge.

    Args:
        num_hosts: how many hosts (namespaces).
        rate: each host's link rate in each direction ('1gbit', '100mbit' or
            bits per second); None leaves links unlimited.
        hostname_prefix: hosts are named ``<prefix>0``, ``<prefix>1``, ...
    """

    def __init__(self, num_hosts: int, *, rate: str | int | None = "1gbit", hostname_prefix: str = "node") -> None:
        if num_hosts < 1:
            raise ValueError(f"num_hosts={num_hosts} must be >= 1")
        self.rate_bits = None if rate is None else netns.parse_rate(rate)
        base = f"{netns.PREFIX}-{os.getpid()}-{next(_sequence)}"
        self.network = netns.Network(base, num_hosts, self.rate_bits)
        self.hosts = [
            Host(i, ns, f"{hostname_prefix}{i}", addr, self.network.interface)
            for i, (ns, addr) in enumerate(zip(self.network.host_namespaces, self.network.addresses, strict=True))
        ]
        self.workdir: str | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[object] = []
        self._previous_sigterm: object | None = None

    # Lifetime ---------------------------------------------------------------

    def __enter__(self) -> EmulatedCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._previous_sigterm = _unwind_on_sigterm()
        try:
            self.workdir = tempfile.mkdtemp(prefix=f"{self.network.base}-")
            with open(self.hosts_file, "w") as f:
                f.write("127.0.0.1 localhost\n::1 localhost\n")
                f.writelines(f"{h.address} {h.hostname}\n" for h in self.hosts)
            self.network.create()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kills every process, deletes namespaces and links, removes the work
        directory. Safe to call twice and after a failed start."""
        try:
            self.kill_processes()
        finally:
            self.network.destroy()
            for log in self._logs:
                log.close()  # type: ignore[attr-defined]
            self._logs.clear()
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None
            if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._previous_sigterm)  # type: ignore[arg-type]
                self._previous_sigterm = None

    @property
    def hosts_file(self) -> str:
        assert self.workdir is not None, "the cluster is not started"
        return os.path.join(self.workdir, "hosts")

    # Processes --------------------------------------------------------------

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = launcher_free_environment()
        env.update(GLOO_SOCKET_IFNAME=self.network.interface, NCCL_SOCKET_IFNAME=self.network.interface,
                   OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        env.update(extra or {})
        return env

    def command(self, host: Host, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run on ``host``: its namespace, host name and hosts file."""
        return ["ip", "netns", "exec", host.namespace, "unshare", "--uts", "--mount", "--propagation", "private",
                "--", "sh", "-c", _HOST_SHELL, "sh", host.hostname, self.hosts_file, *argv]

    def popen(self, host: Host, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, log_name: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
        """Starts ``argv`` on ``host`` in a new session, output to a log file in
        the work directory. Returns the process and the log's path."""
        assert self.workdir is not None, "the cluster is not started"
        path = os.path.join(self.workdir, log_name or f"{host.hostname}-{len(self._procs)}.log")
        log = open(path, "wb")  # closed in close(), after the process ends
        self._logs.append(log)
        proc = subprocess.Popen(self.command(host, argv), env=self.environment(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append(proc)
        return proc, path

    def run(self, argv_for: Callable[[Host], Sequence[str]], *, timeout: float,
            env: Mapping[str, str] | Callable[[Host], Mapping[str, str]] | None = None,
            cwd: str | None = None) -> list[HostResult]:
        """Runs ``argv_for(host)`` on every host at once (host 0 first) and
        waits for all of them. ``env`` adds variables, the same for every host
        or per host (e.g. each host's CUDA_VISIBLE_DEVICES).

        Raises:
            ClusterTimeout: when any still runs after ``timeout`` seconds; all
                are killed first, and the message holds every host's log tail.
        """
        env_for = env if callable(env) else (lambda host: env)
        started = [(host, *self.popen(host, argv_for(host), env=env_for(host), cwd=cwd)) for host in self.hosts]
        deadline = time.monotonic() + timeout
        while any(proc.poll() is None for _, proc, _ in started):
            if time.monotonic() > deadline:
                running = [host.hostname for host, proc, _ in started if proc.poll() is None]
                self.kill_processes()
                logs = "".join(f"\n--- {host.hostname} ({path}) ---\n{_tail(HostResult(host, -1, path).log())}"
                               for host, _, path in started)
                raise ClusterTimeout(f"hosts {running} still ran after {timeout:.0f} s and were killed{logs}")
            time.sleep(0.05)
        return [HostResult(host, proc.returncode, path) for host, proc, path in started]

    def torchrun_argv(self, host: Host, nproc_per_node: int, command: Sequence[str], *,
                      port: int = DEFAULT_PORT) -> list[str]:
        """torchrun for ``host`` with a static rendezvous on host 0, so host i
        holds global ranks ``[i*G, (i+1)*G)``. ``command`` is a full argv (for
        a script: ``[sys.executable, script, ...]``)."""
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(self.hosts)}",
                f"--nproc-per-node={nproc_per_node}", f"--node-rank={host.index}",
                f"--master-addr={self.hosts[0].address}", f"--master-port={port}", "--max-restarts=0",
                "--no-python", *command]

    def run_torchrun(self, nproc_per_node: int, command: Sequence[str], *, timeout: float,
                     env: Mapping[str, str] | Callable[[Host], Mapping[str, str]] | None = None,
                     cwd: str | None = None,
                     port: int = DEFAULT_PORT) -> list[HostResult]:
        """``torchrun --nnodes N --nproc-per-node G ... command`` on every host."""
        return self.run(lambda host: self.torchrun_argv(host, nproc_per_node, command, port=port),
                        timeout=timeout, env=env, cwd=cwd)

    def running_processes(self) -> dict[str, list[int]]:
        """Pids still alive inside each host's namespace (empty lists when none)."""
        return {host.hostname: netns.namespace_pids(host.namespace) for host in self.hosts}

    def kill_processes(self, grace_s: float = 3.0) -> None:
        """SIGTERM to every session we started and every process inside our
        namespaces; SIGKILL after ``grace_s``."""
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        netns.kill_namespace_processes(self.network.host_namespaces, grace_s)
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
