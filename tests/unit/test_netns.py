"""The pure parts of the emulated cluster's plumbing (no root needed)."""

from __future__ import annotations

import ipaddress

import pytest

from alltoall.testing import netns


@pytest.mark.parametrize("text,bits", [("1gbit", 10**9), ("100mbit", 10**8), ("250kbit", 250_000),
                                       ("1.5Gbit", 1_500_000_000), ("800", 800), (" 10 mbit ", 10**7),
                                       (12345, 12345)])
def test_parse_rate(text, bits):
    assert netns.parse_rate(text) == bits


@pytest.mark.parametrize("text", ["1gbps", "fast", "", "0mbit", -5, "1 g"])
def test_parse_rate_rejects_names_the_value(text):
    with pytest.raises(ValueError, match="rate="):
        netns.parse_rate(text)


def test_tbf_burst_holds_an_offload_packet_and_4_ms_of_traffic():
    args = netns.tbf_args(10**9)
    assert args[:3] == ["tbf", "rate", "1000000000bit"]
    assert int(args[args.index("burst") + 1]) == 10**9 // 8 // 250
    assert int(netns.tbf_args(10**6)[4]) == 128 * 1024


def test_host_addresses_stay_in_10_231():
    addresses = [netns.host_address(i) for i in range(300)]
    assert all(a in ipaddress.ip_network("10.231.0.0/16") for a in addresses)
    assert str(addresses[0]) == "10.231.0.1" and len(set(addresses)) == 300
    with pytest.raises(ValueError, match="does not fit"):
        netns.host_address(70000)


def test_creator_pid_only_for_our_names():
    assert netns.creator_pid(f"{netns.PREFIX}-1234-0-n1") == 1234
    assert netns.creator_pid(f"{netns.PREFIX}-1234-0-br") == 1234
    assert netns.creator_pid("other-1234-0-n1") is None
    assert netns.creator_pid(f"{netns.PREFIX}-x-0-n1") is None


def test_requirements_say_what_is_missing(monkeypatch):
    """What the multinode tests' skip reason says on a machine without root or tools."""
    if not netns.sys.platform.startswith("linux"):
        assert "need Linux" in netns.missing_requirements()
        return
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert netns.missing_requirements() == "network namespaces need root (running as uid 1000)"
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool in ("tc", "unshare") else f"/bin/{tool}")
    assert netns.missing_requirements() == "missing tools: tc, unshare"
