"""alltoall._env.env_int: the one parser of integer settings."""

from __future__ import annotations

from datetime import timedelta

import pytest

from alltoall._env import env_float, env_int
from alltoall.ops.selection import MAX_PEER_BYTES_ENV, max_peer_bytes
from alltoall.topology.topology import LOCAL_SIZE_ENV, emulated_local_size
from alltoall.transport import TIMEOUT_ENV, resolve_timeout
from alltoall.transport.shm import RING_BYTES_ENV, ShmOptions

NAME = "ALLTOALL_TEST_SETTING"


def test_unset_and_empty_give_the_default(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert env_int(NAME) is None
    assert env_int(NAME, 7) == 7
    monkeypatch.setenv(NAME, "")
    assert env_int(NAME, 7) == 7


def test_a_value_is_parsed(monkeypatch):
    monkeypatch.setenv(NAME, "-12")
    assert env_int(NAME, 7) == -12
    assert env_int(NAME, 7, minimum=-12) == -12


def test_not_an_integer_names_the_variable_and_value(monkeypatch):
    monkeypatch.setenv(NAME, "4k")
    with pytest.raises(ValueError, match=rf"{NAME}='4k' is not an integer"):
        env_int(NAME, 7)


def test_below_the_minimum_names_the_variable_and_bound(monkeypatch):
    monkeypatch.setenv(NAME, "3")
    with pytest.raises(ValueError, match=rf"{NAME}=3 must be at least 4"):
        env_int(NAME, 7, minimum=4)


@pytest.mark.parametrize(("name", "read"), [
    (MAX_PEER_BYTES_ENV, max_peer_bytes),
    (LOCAL_SIZE_ENV, emulated_local_size),
    (RING_BYTES_ENV, lambda: ShmOptions.from_env(4)),
])
def test_every_setting_reads_through_it(monkeypatch, name, read):
    monkeypatch.setenv(name, "many")
    with pytest.raises(ValueError, match=rf"{name}='many' is not an integer"):
        read()


def test_a_number_is_parsed_or_named(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert env_float(NAME) is None
    monkeypatch.setenv(NAME, "2.5")
    assert env_float(NAME) == 2.5
    monkeypatch.setenv(NAME, "soon")
    with pytest.raises(ValueError, match=rf"{NAME}='soon' is not a number of seconds"):
        env_float(NAME, "a number of seconds")


def test_the_timeout_reads_through_it(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "1.5")
    assert resolve_timeout(None) == timedelta(seconds=1.5)
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=rf"{TIMEOUT_ENV}='soon' is not a number of seconds"):
        resolve_timeout(None)
