"""Linux network namespaces, veth links, a bridge and tbf rate limits: the
plumbing of an emulated cluster, through ``ip`` and ``tc``.

Everything this module creates lives inside namespaces it names
``a2a-emu-<creator pid>-...``; no interface, address or route appears in the
machine's own namespace. Deleting a namespace deletes its interfaces, and a
veth pair dies with either end. ``remove_leftovers`` deletes namespaces whose
creator process is gone, and nothing else, so concurrent runs never touch
each other's clusters.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

PREFIX = "a2a-emu"
# Emulated hosts take addresses from this block only, and only inside their namespaces.
SUBNET = ipaddress.ip_network("10.231.0.0/16")
REQUIRED_TOOLS = ("ip", "tc", "unshare", "mount", "sh")

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed; the message holds the command and its stderr."""


def run_tool(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Runs ``ip``, ``tc`` or similar; raises NetnsError naming the command."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc


def parse_rate(rate: str | int) -> int:
    """Bits per second from tc-style text ('1gbit', '100mbit', '250kbit') or an int.

    Raises:
        ValueError: naming the rate, when it is not positive or not understood.
    """
    if isinstance(rate, int):
        bits = rate
    else:
        match = _RATE.match(rate)
        if not match:
            raise ValueError(f"rate={rate!r}: expected bits per second such as '1gbit', '100mbit' or 10**9")
        unit = match.group(2).lower() if match.group(2) else None
        bits = int(float(match.group(1)) * _UNITS[unit])
    if bits <= 0:
        raise ValueError(f"rate={rate!r} must be positive")
    return bits


def tbf_args(rate_bits: int) -> list[str]:
    """A token bucket for ``rate_bits``: a burst of 4 ms at that rate (at least
    128 KiB, so one 64 KiB segmentation-offload packet always fits) and 50 ms of queue."""
    burst = max(rate_bits // 8 // 250, 128 * 1024)
    return ["tbf", "rate", f"{rate_bits}bit", "burst", str(burst), "latency", "50ms"]


def host_address(index: int) -> ipaddress.IPv4Address:
    """The address of emulated host ``index`` (0-based) in SUBNET."""
    if not 0 <= index < SUBNET.num_addresses - 2:
        raise ValueError(f"host index {index} does not fit in {SUBNET}")
    return SUBNET.network_address + 1 + index


def list_namespaces() -> list[str]:
    out = run_tool("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(namespace: str) -> list[int]:
    """Every process whose network namespace is ``namespace``."""
    proc = run_tool("ip", "netns", "pids", namespace, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def kill_namespace_processes(namespaces: Iterable[str], grace_s: float = 3.0) -> None:
    """SIGTERM, then after ``grace_s`` SIGKILL, every process inside ``namespaces``."""
    namespaces = list(namespaces)

    def signal_all(sig: int) -> int:
        count = 0
        for ns in namespaces:
            for pid in namespace_pids(ns):
                try:
                    os.kill(pid, sig)
                    count += 1
                except ProcessLookupError:
                    pass
        return count

    if not signal_all(signal.SIGTERM):
        return
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        if not any(namespace_pids(ns) for ns in namespaces):
            return
        time.sleep(0.1)
    signal_all(signal.SIGKILL)
    end = time.monotonic() + 5.0
    while time.monotonic() < end and any(namespace_pids(ns) for ns in namespaces):
        time.sleep(0.05)


def delete_namespaces(namespaces: Iterable[str]) -> None:
    """Kills what runs inside, then deletes; missing namespaces are ignored."""
    existing = set(list_namespaces())
    namespaces = [ns for ns in namespaces if ns in existing]
    kill_namespace_processes(namespaces)
    for ns in namespaces:
        run_tool("ip", "netns", "delete", ns, check=False)


def creator_pid(namespace: str) -> int | None:
    """The pid embedded in one of our namespace names, else None (not ours)."""
    match = re.match(rf"^{re.escape(PREFIX)}-(\d+)-", namespace)
    return int(match.group(1)) if match else None


def remove_leftovers() -> list[str]:
    """Deletes our namespaces whose creator process no longer exists (a run
    killed before it could clean up). Returns their names."""
    stale = [ns for ns in list_namespaces()
             if (pid := creator_pid(ns)) is not None and not os.path.exists(f"/proc/{pid}")]
    delete_namespaces(stale)
    return stale


class Network:
    """A bridge in its own namespace and one namespace per host, each joined
    to the bridge by a veth pair whose host end is ``eth0``.

    ``rate_bits`` limits each host's link in both directions with tbf: on the
    host's ``eth0`` (what it sends) and on its bridge port (what it receives),
    like a full-duplex NIC. Traffic between processes of one host, even to its
    own ``eth0`` address, takes the loopback path and is not limited.
    """

    def __init__(self, base: str, num_hosts: int, rate_bits: int | None) -> None:
        self.base = base
        self.bridge_namespace = f"{base}-br"
        self.host_namespaces = [f"{base}-n{i}" for i in range(num_hosts)]
        self.addresses = [str(host_address(i)) for i in range(num_hosts)]
        self.rate_bits = rate_bits
        self.interface = "eth0"

    @property
    def namespaces(self) -> list[str]:
        return [*self.host_namespaces, self.bridge_namespace]

    def create(self) -> None:
        """Creates everything; on failure removes what was created and re-raises."""
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise

    def _create(self) -> None:
        br = self.bridge_namespace
        existing = set(list_namespaces())
        clash = [ns for ns in self.namespaces if ns in existing]
        if clash:
            raise NetnsError(f"namespaces {clash} exist already")
        run_tool("ip", "netns", "add", br)
        run_tool("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        run_tool("ip", "-n", br, "link", "set", "br0", "up")
        prefix_len = SUBNET.prefixlen
        for i, (ns, addr) in enumerate(zip(self.host_namespaces, self.addresses, strict=True)):
            port = f"p{i}"
            run_tool("ip", "netns", "add", ns)
            # Created inside the bridge's namespace with the peer moved straight
            # into the host's: the machine's own namespace never sees either end.
            run_tool("ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", self.interface,
                     "netns", ns)
            run_tool("ip", "-n", br, "link", "set", port, "master", "br0")
            run_tool("ip", "-n", br, "link", "set", port, "up")
            run_tool("ip", "-n", ns, "link", "set", "lo", "up")
            run_tool("ip", "-n", ns, "addr", "add", f"{addr}/{prefix_len}", "dev", self.interface)
            run_tool("ip", "-n", ns, "link", "set", self.interface, "up")
            if self.rate_bits is not None:
                tbf = tbf_args(self.rate_bits)
                run_tool("tc", "-n", ns, "qdisc", "add", "dev", self.interface, "root", *tbf)
                run_tool("tc", "-n", br, "qdisc", "add", "dev", port, "root", *tbf)

    def qdisc(self, host: int) -> str:
        """``tc qdisc show`` of a host's link, for checks and logs."""
        return run_tool("tc", "-n", self.host_namespaces[host], "qdisc", "show", "dev", self.interface).stdout

    def destroy(self) -> None:
        delete_namespaces(self.namespaces)


def missing_requirements() -> str | None:
    """Why namespaces cannot be used here, or None when they can (checked
    without creating anything)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    return None

