"""Runs a command on an emulated cluster: N hosts on this machine (network
namespaces, root only), each with its own host name and a rate-limited link.

By default every host runs ``torchrun --nnodes N --nproc-per-node G
--node-rank i --master-addr <host 0> ... --no-python COMMAND``, so COMMAND
is what every rank runs, e.g.::

    sudo .venv/bin/python bench/emulated_cluster.py --nodes 4 --nproc-per-node 2 -- \\
        .venv/bin/alltoall-bench -b 1K -e 4M -f 4 --algorithms flat,hierarchical,torch --json FILE --plot FILE.png

``--per-host`` runs COMMAND once per host instead (no torchrun), and
``--measure-links`` measures what the emulation gives: TCP throughput from
host 1 to host 0 (through the rate limit) and from host 0 to its own address
(loopback, not limited). Host logs are printed at the end; the exit status is
the first non-zero one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from alltoall.testing import EmulatedCluster, unavailable_reason

# Host 0 receives from host 1, then from itself via its eth0 address; prints Gbit/s for each.
_LINK_PROBE = r"""
import json, socket, sys, time
index, nbytes, me = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
chunk = b"x" * (1 << 20)
def send(to):
    for _ in range(600):
        try:
            conn = socket.create_connection((to, 7001), timeout=10)
            break
        except OSError:
            time.sleep(0.05)
    left = nbytes
    while left > 0:
        left -= conn.send(chunk[:min(left, len(chunk))])
    conn.close()
if index == 0:
    import threading
    server = socket.create_server(("0.0.0.0", 7001))
    rates = {}
    for label in ("inter_host_gbit_s", "intra_host_gbit_s"):
        if label == "intra_host_gbit_s":
            threading.Thread(target=send, args=(me,), daemon=True).start()
        conn, _ = server.accept()
        got, start = 0, time.perf_counter()
        while (data := conn.recv(1 << 20)):
            got += len(data)
        rates[label] = got * 8 / (time.perf_counter() - start) / 1e9
        conn.close()
    print(json.dumps(rates))
elif index == 1:
    send("node0")
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--nproc-per-node", type=int, default=4)
    parser.add_argument("--rate", default="1gbit", help="per-host link rate each way ('none': unlimited)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="kill everything after this many seconds")
    parser.add_argument("--port", type=int, default=29500)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--per-host", action="store_true", help="run COMMAND once per host, without torchrun")
    mode.add_argument("--measure-links", action="store_true", help="measure inter- and intra-host TCP throughput")
    parser.add_argument("--probe-bytes", type=int, default=256 << 20)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and not args.measure_links:
        parser.error("give the command after --")
    reason = unavailable_reason()
    if reason:
        print(f"emulated cluster unavailable: {reason}", file=sys.stderr)
        return 2
    rate = None if args.rate.lower() == "none" else args.rate
    env = {"ALLTOALL_EMULATED_RATE": args.rate, "PYTHONUNBUFFERED": "1"}
    with EmulatedCluster(args.nodes, rate=rate) as cluster:
        if args.measure_links:
            if args.nodes < 2:
                parser.error("--measure-links needs --nodes 2 or more")
            results = cluster.run(lambda h: [sys.executable, "-c", _LINK_PROBE, str(h.index), str(args.probe_bytes),
                                             cluster.hosts[0].address], timeout=args.timeout, env=env)
        elif args.per_host:
            results = cluster.run(lambda h: command, timeout=args.timeout, env=env, cwd=os.getcwd())
        else:
            results = cluster.run_torchrun(args.nproc_per_node, command, timeout=args.timeout, env=env,
                                           cwd=os.getcwd(), port=args.port)
        texts = [r.log() for r in results]  # the work directory goes with the cluster
    for r, text in zip(results, texts, strict=True):
        print(f"=== {r.host.hostname} ({r.host.address}): exit {r.returncode} ===")
        print(text, end="")
    if args.measure_links and results[0].returncode == 0:
        rates = json.loads(texts[0].strip().splitlines()[-1])
        print(f"link rate {args.rate}: " + ", ".join(f"{k} = {v:.2f}" for k, v in rates.items()))
    return next((r.returncode for r in results if r.returncode != 0), 0)


if __name__ == "__main__":
    raise SystemExit(main())
