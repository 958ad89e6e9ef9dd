"""The fault campaign of issue 24 (bench, not CI): N trials of 8 ranks on
one host, each a loop of random-size exchanges in which one rank, at a
random call, suffers one fault:

- ``kill``: SIGKILL;
- ``stop``: SIGSTOP, past the timeout (the harness SIGKILLs it afterwards);
- ``raise``: an argument error on that rank alone (input splits that do not
  sum to its rows), caught; the rank lives on, idle;
- ``fill``: /dev/shm is filled to the last byte by a file (the run is in a
  private mount namespace with its own tmpfs, so the host's /dev/shm is
  untouched); no rank fails, so every rank must finish with right results.

Configurations rotate over flat and hierarchical (emulated 2 x 4 nodes,
``local_size=4``) and both transports (shm, c10d over gloo). Reported per
(transport, fault): trials, hangs (a survivor still in a call at fault time
+ timeout + 5 s), wrong results, the survivors' detection time (their error
minus the fault; p50, p99, max), and, over the campaign, segments left in
/dev/shm and processes left.

  flock /tmp/alltoall-bench.lock .venv/bin/python bench/faults.py --trials 16

A long campaign runs in chunks (each under the lock, releasing it between):
``--first K`` starts at trial K (same seed: trial i is the same trial in any
chunk), ``--json`` keeps each chunk's records, and ``--summarize a.json
b.json ...`` prints the table over all of them.

``--hosts 2`` emulates 2 hosts of 4 ranks (root only): an EmulatedCluster's
network namespaces with 1 Gbit/s links; each rank joins its host's network
namespace and takes its host name (``ALLTOALL_HOSTNAME``), so phases inside
a host use shared memory ("shm" runs ``transport="auto"``) and phases
between hosts gloo over the links. /dev/shm is still one for both hosts.

Root re-runs itself in a private mount namespace (``unshare -m``) with a
256 MiB tmpfs on /dev/shm, for ``fill``; elsewhere ``fill`` is skipped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import timedelta

WORLD = 8
# Set once, in the harness, and inherited by the spawned ranks (which import
# this module again with pids of their own), so every name agrees.
PREFIX = os.environ.setdefault("ALLTOALL_FAULTS_PREFIX", f"alltoall-faults{os.getpid()}-")
FAULTS = ("kill", "stop", "raise", "fill")
START_METHOD = "forkserver"  # --start-method
CONFIGS = [(alg, tr) for tr in ("shm", "c10d") for alg in ("flat", "hierarchical")]


def _expected(p: int, rank: int, rows: list[list[int]], width: int, call: int):
    import torch

    # Row r from source s for this rank holds s * 1e4 + call * 10 + r % 10.
    parts = [torch.full((rows[s][rank], width), float(s * 10000 + call * 10)) +
             (torch.arange(rows[s][rank]) % 10).unsqueeze(1).float() for s in range(p)]
    return torch.cat(parts)


def _input(p: int, rank: int, rows: list[list[int]], width: int, call: int):
    import torch

    parts = [torch.full((rows[rank][d], width), float(rank * 10000 + call * 10)) +
             (torch.arange(rows[rank][d]) % 10).unsqueeze(1).float() for d in range(p)]
    return torch.cat(parts)


def _join_host(namespace: str, hostname: str) -> None:
    """Moves this process into an emulated host's network namespace."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
    finally:
        os.close(fd)
    os.environ.update(ALLTOALL_HOSTNAME=hostname, GLOO_SOCKET_IFNAME=os.environ["ALLTOALL_FAULTS_IFACE"])


def _rank(rank: int, store: str, cfg: dict, fault_at, results, release) -> None:
    os.environ["ALLTOALL_SHM_PREFIX"] = PREFIX
    transport = cfg["transport"]
    if cfg.get("netns"):
        per_host = WORLD // len(cfg["netns"])
        _join_host(cfg["netns"][rank // per_host], f"node{rank // per_host}")
        if transport == "shm":
            transport = "auto"  # shared memory inside a host, gloo between hosts
    import torch
    import torch.distributed as dist

    import alltoall

    torch.set_num_threads(1)
    rng = random.Random(cfg["seed"])
    state = "setup"
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=cfg["timeout"]))
        local = 4 if cfg["algorithm"] == "hierarchical" else None
        comm = alltoall.Communicator(transport=transport, timeout=cfg["timeout"], local_size=local)
        dist.barrier()
        wrong = 0
        for call in range(cfg["calls"]):
            width = rng.choice([1, 16, 256])
            rows = [[rng.randrange(0, rng.choice([4, 64, 2048])) for _ in range(WORLD)] for _ in range(WORLD)]
            x = _input(WORLD, rank, rows, width, call)
            if call == cfg["at"] and rank == cfg["victim"]:
                fault_at.value = time.time()
                if cfg["fault"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if cfg["fault"] == "stop":
                    os.kill(os.getpid(), signal.SIGSTOP)
                if cfg["fault"] == "raise":
                    try:
                        comm.all_to_all_v(x, [r + 1 for r in rows[rank]], [rows[s][rank] for s in range(WORLD)],
                                          cfg["algorithm"])
                    except ValueError:
                        pass
                    results.put((rank, "victim", "", 0.0, wrong))
                    release.wait(10 * cfg["timeout"])
                    os._exit(0)
            if call == cfg["at"] and rank == 0 and cfg["fault"] == "fill":
                fault_at.value = time.time()
                _fill_dev_shm()
            state = "in-call"
            out = comm.all_to_all_v(x, rows[rank], [rows[s][rank] for s in range(WORLD)], cfg["algorithm"])
            state = "between"
            if not torch.equal(out, _expected(WORLD, rank, rows, width, call)):
                wrong += 1
        results.put((rank, "completed", "", time.time(), wrong))
    except BaseException as error:
        results.put((rank, type(error).__name__, f"[{state}] {str(error)[:400]}", time.time(), 0))
    finally:
        results.close()
        results.join_thread()
        release.wait(10 * cfg["timeout"])
        os._exit(0)  # a dead peer can hang gloo's teardown


def _fill_dev_shm() -> None:
    path = f"/dev/shm/{PREFIX}fill"
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    # The segments were reserved at creation: exchanges go on. Free it again
    # at the end of the trial (the harness removes it).


def _trial(index: int, fault: str, algorithm: str, transport: str, timeout: float, seed: int,
           prefill: bool = False) -> dict:
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        # One server for the campaign, with torch and alltoall imported once:
        # 8 ranks importing torch took most of a trial on a loaded 2-core host.
        ctx.set_forkserver_preload(["torch", "torch.distributed", "alltoall"])
    results, release = ctx.Queue(), ctx.Event()
    fault_at = ctx.Value("d", 0.0)
    rng = random.Random(seed)
    cfg = {"seed": seed, "fault": fault, "algorithm": algorithm, "transport": transport, "timeout": timeout,
           "calls": 40, "at": rng.randrange(5, 30), "victim": rng.randrange(WORLD),
           "netns": [n for n in os.environ.get("ALLTOALL_FAULTS_NETNS", "").split(",") if n]}
    if fault == "fill":
        cfg["victim"] = -1
    if prefill:
        # /dev/shm nearly full before set-up, with 0-32 MiB left: round 3's
        # stale fill file left what the last trial's segments had held, so
        # some of a Communicator's segments fit and others did not. After the
        # harness's own semaphores, which live in /dev/shm too.
        _fill_dev_shm()
        path = f"/dev/shm/{PREFIX}fill"
        cfg["prefill_free"] = rng.randrange(0, 32 << 20)
        os.truncate(path, max(0, os.path.getsize(path) - cfg["prefill_free"]))
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, os.path.join(tmp, "store"), cfg, fault_at, results, release))
                 for r in range(WORLD)]
        for p in procs:
            p.start()
        reports: dict[int, tuple] = {}
        # Every rank but a killed or stopped victim must report. By rank, not
        # by count: a victim whose set-up failed (so its fault never came)
        # reports too, and counting it once ended the wait before a survivor's
        # report, which was then listed as hung (round 3's "hung in set-up").
        needed = set(range(WORLD)) - ({cfg["victim"]} if fault in ("kill", "stop") else set())
        deadline = None
        start = time.time()
        while not needed <= reports.keys():
            if fault_at.value and deadline is None:
                deadline = fault_at.value + timeout + 5
            left = (deadline or start + 20 * timeout + 120) - time.time()
            if left <= 0:
                break
            try:
                item = results.get(timeout=min(left, 1.0))
            except Exception:
                if not any(p.is_alive() for p in procs):
                    break  # every rank is gone: no report will come (the missing ones count as hangs)
                continue
            reports[item[0]] = item
        release.set()
        for p in procs:
            p.join(timeout=15)
        survivors = [p for p in procs if p.is_alive()]
        for p in survivors:
            os.kill(p.pid, signal.SIGKILL)  # the stopped victim, and any hung rank
            p.join(timeout=5)
        left_procs = sum(1 for p in procs if p.is_alive())
    try:
        os.unlink(f"/dev/shm/{PREFIX}fill")
    except FileNotFoundError:
        pass
    hangs = [r for r in range(WORLD) if r != cfg["victim"] and r not in reports]
    detections = [item[3] - fault_at.value for r, item in reports.items()
                  if item[1] not in ("completed", "victim") and fault_at.value]
    errors = sorted({item[1] for item in reports.values()})
    wrong = sum(item[4] for item in reports.values())
    # A survivor that completed while the victim failed is only right under
    # "fill"; elsewhere every survivor must raise (its next call needs the victim).
    unexpected = [r for r, item in reports.items() if fault != "fill" and item[1] == "completed"]
    if fault == "fill":
        unexpected = [r for r, item in reports.items() if item[1] != "completed"]
    sample = next((item[2] for item in reports.values() if item[1] not in ("completed", "victim")), "")
    return {"trial": index, "fault": fault, "algorithm": algorithm, "transport": transport, "victim": cfg["victim"],
            "at": cfg["at"], "hangs": hangs, "detections": detections, "errors": errors, "wrong": wrong,
            "unexpected": unexpected, "processes_left": left_procs, "prefill_free": cfg.get("prefill_free"),
            "victim_exit": procs[cfg["victim"]].exitcode if cfg["victim"] >= 0 else None, "sample": sample}


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=10.0, help="the Communicators' timeout, seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--first", type=int, default=0, help="index of the first trial (chunks of one campaign)")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                        help="print the table over these chunks' --json records, run nothing")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: start no trial that would, at the mean trial time so far, end past it")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--transports", default="shm,c10d", help="the transports the configurations rotate over")
    parser.add_argument("--json", default=None, help="write every trial's record here")
    parser.add_argument("--prefill", action="store_true",
                        help="fill /dev/shm before each trial's set-up (root: in the private tmpfs)")
    parser.add_argument("--start-method", default=START_METHOD, choices=["forkserver", "spawn"],
                        help="how the ranks start (forkserver: from a server that imported torch once)")
    parser.add_argument("--hosts", type=int, default=1, choices=[1, 2, 4, 8],
                        help="emulated hosts (network namespaces, root only); 1: this host alone")
    args = parser.parse_args()
    globals()["START_METHOD"] = args.start_method
    if args.hosts > 1 and not args.summarize and "ALLTOALL_FAULTS_NETNS" not in os.environ:
        from alltoall.testing import EmulatedCluster

        # Built outside the private mount namespace below, and removed when
        # the campaign ends, however it ends.
        with EmulatedCluster(args.hosts, rate="1gbit") as cluster:
            env = {**os.environ, "ALLTOALL_FAULTS_NETNS": ",".join(h.namespace for h in cluster.hosts),
                   "ALLTOALL_FAULTS_IFACE": cluster.network.interface}
            code = subprocess.call([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env)
        sys.exit(code)
    if args.summarize:
        records = [r for path in args.summarize for r in json.load(open(path))]
        _table(records, args.timeout)
        return
    faults = args.faults.split(",")
    if ("fill" in faults or args.prefill) and os.environ.get("ALLTOALL_FAULTS_NS") != "1":
        if os.geteuid() == 0:
            env = {**os.environ, "ALLTOALL_FAULTS_NS": "1"}
            command = (f"mount -t tmpfs -o size=256m tmpfs /dev/shm && exec {sys.executable} "
                       + " ".join(map(repr, [os.path.abspath(__file__), *sys.argv[1:]])))
            sys.exit(subprocess.call(["unshare", "-m", "sh", "-c", command], env=env))
        if args.prefill:
            sys.exit("--prefill needs root: it fills a private /dev/shm, never the host's")
        print("not root: 'fill' skipped (it needs a private /dev/shm)", flush=True)
        faults.remove("fill")
    configs = [c for c in CONFIGS if c[1] in args.transports.split(",")]
    records = []
    begin = time.time()
    for i in range(args.first, args.first + args.trials):
        if args.budget and records:
            mean = (time.time() - begin) / len(records)
            if time.time() - begin + 1.5 * mean > args.budget:
                print(f"budget: stopping before trial {i}", flush=True)
                break
        fault = faults[i % len(faults)]
        algorithm, transport = configs[(i // len(faults)) % len(configs)]
        started = time.time()
        record = _trial(i, fault, algorithm, transport, args.timeout, args.seed * 1000 + i, args.prefill)
        record["seconds"] = round(time.time() - started, 2)
        # Counted after each trial, so chunks sum (the trial removed its fill file).
        record["segments_left"] = sorted(n for n in os.listdir("/dev/shm") if n.startswith(PREFIX))
        records.append(record)
        print(json.dumps(record), flush=True)
        if args.json:  # rewritten after every trial: a chunk cut short keeps what it ran
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
    _table(records, args.timeout)


def _table(records: list[dict], timeout: float) -> None:
    leftovers = {n for r in records for n in r.get("segments_left", [])}
    print(f"\n{len(records)} trials, {WORLD} ranks, timeout {timeout:.0f} s; segments left in /dev/shm: "
          f"{len(leftovers)}; processes left: {sum(r['processes_left'] for r in records)}; "
          f"seconds per trial: {sum(r.get('seconds', 0) for r in records) / max(1, len(records)):.1f}")
    # Detections are per survivor: each trial adds one per rank that raised.
    for keys in (("transport", "fault"), ("transport", "algorithm", "fault")):
        by = defaultdict(list)
        for r in records:
            by[tuple(r[k] for k in keys)].append(r)
        width = 12 * len(keys)
        print(f"\n{' '.join(keys):{width}} {'trials':>6} {'hangs':>5} {'wrong':>5} {'unexp':>5} "
              f"{'detect p50':>10} {'p99':>7} {'max':>7}  errors")
        for key, rs in sorted(by.items()):
            det = [d for r in rs for d in r["detections"]]
            print(f"{' '.join(key):{width}} {len(rs):6d} {sum(len(r['hangs']) for r in rs):5d} "
                  f"{sum(r['wrong'] for r in rs):5d} {sum(len(r['unexpected']) for r in rs):5d} "
                  f"{_pct(det, 0.5):9.2f}s {_pct(det, 0.99):6.2f}s {max(det) if det else float('nan'):6.2f}s  "
                  f"{sorted({e for r in rs for e in r['errors']})}")

if __name__ == "__main__":
    main()
