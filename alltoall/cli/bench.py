"""alltoall-bench: the all-to-all microbenchmark, in nccl-tests' format.

Runs under a launcher (torchrun, mpiexec with mpi4py, srun), or starts its own
ranks on this host with --nprocs N. Every algorithm is timed on the same
hashed inputs, each rank checks what it received, and the table reports the
slowest rank's time, bandwidths and the wrong elements summed over ranks.
Exit status: 0, or 3 when any element was wrong (1 on errors, 2 on bad flags).

  alltoall-bench --nprocs 8 --local-size 4 -b 1K -e 4M -f 2
  torchrun --nproc-per-node 4 -m alltoall.bench -b 1K -e 1M --json out.json
  mpiexec -n 4 python -m alltoall.bench --algorithms flat,torch,mpi
  alltoall-bench --nprocs 8 --local-size 4 --backend alltoall --algorithms torch,auto
  alltoall-bench --nprocs 8 --calibrate          # fit a cost profile for "auto"
  alltoall-bench dispatch --nprocs 8 --local-size 4 -S 512 -M 512 -k 8 -E 64   # the expert dispatcher

With a cost profile (--profile, ALLTOALL_PROFILE, or the file --calibrate
writes), a model section follows the tables: predicted against measured
time per algorithm and size, and what "auto" picked.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import alltoall
import alltoall.transport
from alltoall.backend import BACKEND_NAME
from alltoall.cli import bench_algorithms, bench_model, bench_report, bench_traffic, calibrate
from alltoall.cli.bench_launch import launched_by_self, self_launch
from alltoall.cli.bench_run import SweepOptions, sweep
from alltoall.cli.info import build_lines
from alltoall.launch import LaunchInfo, detect_launcher, init_distributed
from alltoall.plan import profile as profiles
from alltoall.topology import LOCAL_SIZE_ENV

EXIT_WRONG = 3


def _typed(convert, what: str):
    def parse(text: str):
        try:
            return convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = what
    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is not >= 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def _parse_transports(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in alltoall.transport.TRANSPORTS]
    if unknown or not names:
        raise ValueError(f"{text!r}: unknown {unknown or 'empty list'}; choose from "
                         f"{', '.join(alltoall.transport.TRANSPORTS)}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alltoall-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = _typed(bench_traffic.parse_size, "size")
    p.add_argument("-b", "--minbytes", type=size, default=bench_traffic.parse_size("1K"),
                   help="smallest size, bytes per rank (suffixes K, M, G; default 1K)")
    p.add_argument("-e", "--maxbytes", type=size, default=bench_traffic.parse_size("4M"),
                   help="largest size, bytes per rank (default 4M)")
    p.add_argument("-f", "--stepfactor", type=_typed(_positive, "factor"), default=2,
                   help="multiply the size by this each step (default 2)")
    p.add_argument("-n", "--iters", type=_typed(_positive, "count"), default=20,
                   help="timed iterations per size (default 20)")
    p.add_argument("-w", "--warmup_iters", type=_typed(_non_negative, "count"), default=5,
                   help="untimed warm-up iterations per size (default 5)")
    p.add_argument("-R", "--rounds", type=_typed(_positive, "rounds"), default=1,
                   help="split the timed iterations into this many rounds that alternate the algorithms; "
                        "the time is still the mean over all of them (default 1)")
    p.add_argument("-c", "--check", type=_typed(_non_negative, "count"), default=1,
                   help="checked iterations per size, 0 to skip the check (default 1)")
    p.add_argument("-d", "--datatype", type=_typed(bench_traffic.parse_dtype, "dtype"), default="float",
                   help=f"element type: {', '.join(bench_traffic.DTYPES)} (default float)")
    p.add_argument("--algorithms", type=_typed(bench_algorithms.parse_algorithms, "algorithms"), default="all",
                   help=f"comma-separated, from {','.join(bench_algorithms.REGISTRY)} (default all: every one "
                        "but auto); those that cannot run here are skipped with the reason")
    p.add_argument("--splits", type=_typed(bench_traffic.parse_splits, "splits"), default="uniform",
                   help="uniform, zipf:ALPHA (skewed, MoE-like) or a file of n x n weights; "
                        "uneven splits time the all_to_all_v variants")
    p.add_argument("--transports", type=_typed(_parse_transports, "transports"), default="auto",
                   help="comma-separated transports for our algorithms: auto, shm, c10d (default auto); "
                        "the first keeps the plain names, the others add a suffix (flat-c10d)")
    p.add_argument("--tp", type=_typed(_positive, "tp"), default=1,
                   help="tensor-parallel degree for the coordinated algorithm (default 1)")
    p.add_argument("--local-size", type=_typed(_positive, "local size"), default=None,
                   help="emulate nodes of this many consecutive ranks (default: detect by host name)")
    p.add_argument("--backend", default=None,
                   help="torch.distributed backend of the default group (default: nccl with GPUs, else gloo); "
                        "'alltoall' sends the torch baseline through this library's backend (docs/api.md)")
    p.add_argument("--nprocs", type=_typed(_positive, "nprocs"), default=None,
                   help="not under a launcher: start this many local ranks (gloo on CPU, NCCL with GPUs)")
    p.add_argument("--threads", type=_typed(_positive, "threads"), default=1,
                   help="torch threads per rank on CPU (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hashed inputs and of zipf's hot ranks")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (schema: docs/bench.schema.json)")
    p.add_argument("--csv", metavar="FILE", help="write one CSV row per algorithm and size")
    p.add_argument("--plot", metavar="FILE.png", help="plot busbw and latency against size (needs matplotlib)")
    p.add_argument("--table", metavar="FILE", help="also write the printed table to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only on a terminal)")
    p.add_argument("--profile", metavar="FILE|NAME",
                   help=f"cost profile for auto and the model section (sets {profiles.PROFILE_ENV}; a file, "
                        f"or a shipped name: {', '.join(profiles.shipped_names())}); with --calibrate, where "
                        f"to write it (default {profiles.PROFILE_ENV}, else {profiles.default_path()})")
    p.add_argument("--calibrate", action="store_true",
                   help="instead of the sweep, fit a cost profile (alpha and bandwidth per link class, copy "
                        "rate) from short timed exchanges, print the fit and its error, and write it")
    p.add_argument("--calibrate-first", action="store_true",
                   help="calibrate as --calibrate does (and write the profile), then run the sweep with that "
                        "profile in the same job: its predictions and the times they are checked against come "
                        "from one launch")
    return p


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _check_world(parser: argparse.ArgumentParser, args: argparse.Namespace, world_size: int) -> None:
    if world_size % args.tp:
        parser.error(f"--tp {args.tp} does not divide the world size {world_size}")
    if args.local_size is not None and world_size % args.local_size:
        parser.error(f"--local-size {args.local_size} does not divide the world size {world_size}")
    if isinstance(args.splits, bench_traffic.SplitsSpec) and args.splits.weights is not None \
            and len(args.splits.weights) != world_size:
        n = len(args.splits.weights)
        parser.error(f"--splits {args.splits.text}: a {n}x{n} matrix, but the world has {world_size} ranks")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dispatch"]:
        from alltoall.cli import bench_dispatch

        return bench_dispatch.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot and not _have_matplotlib():
        print("alltoall-bench: --plot needs matplotlib, which is not installed: pip install 'alltoall[bench]'",
              file=sys.stderr)
        return 2
    if args.profile:
        os.environ[profiles.PROFILE_ENV] = args.profile  # the ranks (self-launched too) inherit it
    launcher = detect_launcher()
    if launcher is None:
        if args.nprocs is None:
            parser.error("not under a launcher: pass --nprocs N to start N local ranks, "
                         "or run under torchrun, mpiexec or srun")
        _check_world(parser, args, args.nprocs)
        return self_launch(argv, args.nprocs, ok_codes=(0, EXIT_WRONG))
    if args.nprocs is not None and not launched_by_self():
        parser.error(f"--nprocs starts local ranks itself; under {launcher} the launcher sets the world size")
    return _run_rank(parser, args, argv)


def _run_rank(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    if args.backend == BACKEND_NAME and args.local_size is not None:
        # The backend's groups then see the nodes the Communicator emulates.
        os.environ.setdefault(LOCAL_SIZE_ENV, str(args.local_size))
    launch = init_distributed(backend=args.backend)
    try:
        # In a function of its own, so the Communicator (which holds the
        # process groups) is released before the groups are destroyed.
        return _bench(parser, args, argv, launch)
    finally:
        dist.destroy_process_group()


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str], launch: LaunchInfo) -> int:
    _check_world(parser, args, launch.world_size)
    on_gpu = launch.backend == "nccl" or (launch.backend == BACKEND_NAME and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.calibrate or args.calibrate_first:
        topology = alltoall.Topology.detect(None, local_size=args.local_size)
        calibrate.run(topology, None)
        if args.calibrate:
            return 0
    # One Communicator per transport, created in the same order everywhere.
    comms = {t: alltoall.Communicator(local_size=args.local_size, transport=t) for t in args.transports}
    comm = comms[args.transports[0]]
    launcher = "self" if launched_by_self() else launch.launcher
    ctx = bench_algorithms.BenchContext(comm, launcher, launch.backend, device, args.tp, args.splits.uniform, comms)
    runners, skipped, descriptions = bench_algorithms.prepare(args.algorithms, ctx)
    dtype_name, dtype = args.datatype
    element_size = torch.empty((), dtype=dtype).element_size()
    sizes = bench_traffic.size_sweep(args.minbytes, args.maxbytes, args.stepfactor, comm.size, element_size)
    biggest = bench_traffic.traffic_matrix(args.splits, comm.size, sizes[-1] // element_size, args.seed)
    run = bench_report.BenchRun(
        argv=["alltoall-bench", *argv], world_size=comm.size, launcher=launcher, backend=launch.backend,
        device=str(device), topology=comm.topology.describe(), local_size=args.local_size, tp=args.tp,
        build=build_lines(machine=False), dtype=dtype_name, element_size=element_size, splits=args.splits.text,
        receive_imbalance=bench_traffic.receive_imbalance(biggest), iterations=args.iters, rounds=args.rounds,
        warmup=args.warmup_iters, checks=args.check, seed=args.seed,
        threads=torch.get_num_threads() if device.type == "cpu" else 0,
        algorithms=descriptions, skipped=skipped)
    leader = comm.rank == 0
    if leader:
        print("\n".join(bench_report.header_lines(run)), flush=True)
    opts = SweepOptions(sizes, dtype_name, dtype, args.iters, args.warmup_iters, args.check, args.seed,
                        args.rounds, args.splits)
    run.rows = sweep(ctx, runners, opts, show_progress=not args.no_progress)
    run.model = bench_model.evaluate(comms, sizes, element_size, args.splits.uniform)
    if leader:
        _report(run, args)
    return EXIT_WRONG if run.wrong_total else 0


def _report(run: bench_report.BenchRun, args: argparse.Namespace) -> None:
    text = bench_report.report_text(run)
    body = text.split("\n", len(bench_report.header_lines(run)))[-1]
    print(body, end="", flush=True)
    written: list[tuple[str, str]] = []
    for path, what, write in ((args.table, "table", lambda p: _write_text(p, text)),
                              (args.json, "JSON", lambda p: bench_report.write_json(run, p)),
                              (args.csv, "CSV", lambda p: bench_report.write_csv(run, p)),
                              (args.plot, "plot", lambda p: _plot(run, p))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write(path)
            written.append((what, path))
    for what, path in written:
        print(f"# wrote {what}: {path}")


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _plot(run: bench_report.BenchRun, path: str) -> None:
    from alltoall.cli.bench_plot import write_plot

    write_plot(run, path)


if __name__ == "__main__":
    raise SystemExit(main())
