"""The emulated cluster itself: hosts with their own names, addresses and
rate-limited links, nothing added to the machine's own network, and nothing
left behind after an exception, a timeout or a killed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from alltoall.testing import ClusterTimeout, netns

pytestmark = pytest.mark.multinode

# Stdlib only, so it starts at once: host 0 accepts a connection from every
# other host, which sends its host name; every host resolves every name.
_PROBE = r"""
import json, socket, sys, time
index, n = int(sys.argv[1]), int(sys.argv[2])
me, peers = socket.gethostname(), []
if index == 0:
    server = socket.create_server(("0.0.0.0", 7000))
    server.settimeout(60)
    for _ in range(n - 1):
        conn, (addr, _port) = server.accept()
        peers.append([addr, conn.recv(100).decode()])
        conn.close()
else:
    for _ in range(600):
        try:
            conn = socket.create_connection(("node0", 7000), timeout=5)
            break
        except OSError:
            time.sleep(0.1)
    conn.sendall(me.encode())
    conn.close()
names = {f"node{i}": socket.gethostbyname(f"node{i}") for i in range(n)}
print(json.dumps({"hostname": me, "resolved": names, "peers": sorted(peers)}))
"""


def machine_network() -> tuple[str, str, str]:
    """The machine's own links, addresses and routes."""
    return tuple(netns.run_tool("ip", "-o", *what).stdout for what in (["link"], ["addr"], ["route"]))


def test_hosts_have_their_own_names_addresses_and_links(cluster_factory):
    before = machine_network()
    namespaces_before = set(netns.list_namespaces())
    with cluster_factory(3, rate="100mbit") as cluster:
        assert machine_network() == before, "the cluster changed the machine's own network"
        results = cluster.run(lambda h: [sys.executable, "-c", _PROBE, str(h.index), "3"], timeout=120)
        assert all(r.returncode == 0 for r in results), [r.log() for r in results]
        seen = [json.loads(r.log().strip().splitlines()[-1]) for r in results]
        addresses = {h.hostname: h.address for h in cluster.hosts}
        for host, report in zip(cluster.hosts, seen, strict=True):
            assert report["hostname"] == host.hostname
            assert report["resolved"] == addresses
            assert host.namespace.startswith(f"{netns.PREFIX}-{os.getpid()}-")
            # Both directions of every link are limited.
            assert "tbf" in cluster.network.qdisc(host.index) and "rate 100Mbit" in cluster.network.qdisc(host.index)
            port = netns.run_tool("tc", "-n", cluster.network.bridge_namespace, "qdisc", "show", "dev",
                                  f"p{host.index}").stdout
            assert "tbf" in port and "rate 100Mbit" in port
        # Connections arrive from each host's own address, across the bridge.
        assert seen[0]["peers"] == [["10.231.0.2", "node1"], ["10.231.0.3", "node2"]]
        assert set(addresses.values()) == {"10.231.0.1", "10.231.0.2", "10.231.0.3"}
        names = cluster.network.namespaces
    assert set(netns.list_namespaces()) == namespaces_before
    assert not set(names) & set(netns.list_namespaces())


def _wait_for(paths: list[str], seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while not all(os.path.exists(p) and open(p).read().strip() for p in paths):
        assert time.monotonic() < end, f"never written: {paths}"
        time.sleep(0.05)


def _gone(pid: int, seconds: float = 10) -> bool:
    end = time.monotonic() + seconds
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_everything_is_removed_when_the_test_body_raises(cluster_factory, tmp_path):
    """Processes that left our session (setsid) are found by namespace and killed too."""
    files = [str(tmp_path / f"pid{i}") for i in range(2)]
    with pytest.raises(RuntimeError, match="test body failed"), cluster_factory(2) as cluster:
        names = cluster.network.namespaces
        for host, path in zip(cluster.hosts, files, strict=True):
            cluster.popen(host, ["sh", "-c", f"setsid sleep 1000 & echo $! > {path}; exec sleep 1000"])
        _wait_for(files)
        raise RuntimeError("test body failed")
    pids = [int(open(p).read()) for p in files]
    assert all(_gone(pid) for pid in pids), f"escaped processes {pids} survived"
    assert not set(names) & set(netns.list_namespaces())


def test_a_run_past_its_deadline_is_killed_and_reported(cluster_factory):
    with cluster_factory(2) as cluster:
        start = time.monotonic()
        with pytest.raises(ClusterTimeout, match=r"hosts \['node0', 'node1'\] still ran after 1 s"):
            cluster.run(lambda h: ["sh", "-c", "echo started on $(hostname); exec sleep 1000"], timeout=1)
        assert time.monotonic() - start < 30
        assert cluster.running_processes() == {"node0": [], "node1": []}


def test_leftovers_of_dead_runs_are_removed_and_live_runs_untouched(cluster_factory):
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = f"{netns.PREFIX}-{finished.pid}-99-n0"
    live = f"{netns.PREFIX}-{os.getpid()}-99-n0"
    if os.path.exists(f"/proc/{finished.pid}"):
        pytest.skip(f"pid {finished.pid} was reused at once")
    try:
        for ns in (dead, live):
            netns.run_tool("ip", "netns", "add", ns)
        orphan = subprocess.Popen(["ip", "netns", "exec", dead, "sleep", "1000"], start_new_session=True)
        end = time.monotonic() + 10
        while not netns.namespace_pids(dead):
            assert time.monotonic() < end
            time.sleep(0.05)
        removed = netns.remove_leftovers()
        assert dead in removed and live not in removed
        assert orphan.wait(timeout=10) != 0
        assert dead not in netns.list_namespaces() and live in netns.list_namespaces()
    finally:
        netns.delete_namespaces([dead, live])


_TERMINATED_RUN = r"""
import sys, time
from alltoall.testing import EmulatedCluster
with EmulatedCluster(2, rate=None) as cluster:
    for host, path in zip(cluster.hosts, sys.argv[1:3]):
        cluster.popen(host, ["sh", "-c", f"echo $$ > {path}; exec sleep 1000"])
    print(" ".join(cluster.network.namespaces), flush=True)
    time.sleep(1000)
"""


def test_a_terminated_run_removes_its_hosts_and_processes(tmp_path):
    """``kill`` (SIGTERM) of the process that owns a cluster, e.g. a stopped
    test session, still removes its namespaces and kills what ran inside."""
    files = [str(tmp_path / f"pid{i}") for i in range(2)]
    owner = subprocess.Popen([sys.executable, "-c", _TERMINATED_RUN, *files], stdout=subprocess.PIPE, text=True)
    try:
        names = owner.stdout.readline().split()
        assert len(names) == 3, f"the cluster did not start: {names}"
        _wait_for(files)
        owner.terminate()
        assert owner.wait(timeout=60) == 128 + 15
    finally:
        owner.kill()
    pids = [int(open(p).read()) for p in files]
    assert all(_gone(pid) for pid in pids), f"processes {pids} survived their cluster"
    assert not set(names) & set(netns.list_namespaces())
