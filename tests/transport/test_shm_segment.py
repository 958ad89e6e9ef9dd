"""The shared-memory segment's rendezvous, alone (one process): permissions,
job tokens, membership, and nothing left in /dev/shm."""

from __future__ import annotations

import os
import secrets

import pytest

from alltoall._library import _C
from tests.conftest import SESSION_PREFIX


def _name() -> str:
    return f"/{SESSION_PREFIX}{secrets.token_hex(6)}"


def test_segment_is_private_to_its_user():
    name = _name()
    segment = _C.ShmSegment.create(name, "token-a", [0, 1], 0, 4096, 5.0)
    try:
        assert segment.mode == 0o600
        assert oct(os.stat("/dev/shm" + name).st_mode & 0o777) == oct(0o600)
    finally:
        segment.unlink()
    assert not os.path.exists("/dev/shm" + name)


def test_another_job_token_cannot_attach():
    name = _name()
    segment = _C.ShmSegment.create(name, "the-job", [3, 5], 0, 4096, 5.0)
    try:
        with pytest.raises(_C.ShmError, match="belongs to another job"):
            _C.ShmSegment.attach(name, "some-other-job", [3, 5], 1, 4096, 5.0)
        with pytest.raises(_C.ShmError, match=r"is for global ranks \[3, 5\] but this process expected \[3, 6\]"):
            _C.ShmSegment.attach(name, "the-job", [3, 6], 1, 4096, 5.0)
        peer = _C.ShmSegment.attach(name, "the-job", [3, 5], 1, 4096, 5.0)
        assert peer.name == name
    finally:
        segment.unlink()


def test_attach_waits_a_bounded_time_for_the_creator():
    with pytest.raises(_C.ShmError, match=r"was not created by group rank 0 \(global rank 7\) within 200 ms"):
        _C.ShmSegment.attach(_name(), "t", [7, 8], 1, 4096, 0.2)


def test_creating_an_existing_name_fails():
    name = _name()
    segment = _C.ShmSegment.create(name, "t", [0, 1], 0, 4096, 5.0)
    try:
        with pytest.raises(_C.ShmError, match="cannot create shared-memory segment"):
            _C.ShmSegment.create(name, "t", [0, 1], 0, 4096, 5.0)
    finally:
        segment.unlink()


@pytest.mark.parametrize(
    ("name", "token", "ranks", "rank", "match"),
    [
        ("no-slash", "t", [0], 0, "must be '/' followed by a name"),
        ("/a/b", "t", [0], 0, "must be '/' followed by a name"),
        ("/ok", "", [0], 0, "job token must have 1 to 63 characters"),
        ("/ok", "t", [], 0, "needs 1 to 4096 members"),
        ("/ok", "t", [0, 1], 2, "rank 2 is outside a group of 2"),
    ],
)
def test_bad_specs_are_rejected_before_creating_anything(name, token, ranks, rank, match):
    with pytest.raises(_C.ShmError, match=match):
        _C.ShmSegment.create(name, token, ranks, rank, 4096, 1.0)


def test_a_member_that_never_attached_is_not_alive():
    name = _name()
    segment = _C.ShmSegment.create(name, "t", [0, 1, 2], 0, 4096, 5.0)
    try:
        # This process holds rank 0's lock; ranks 1 and 2 hold none.
        assert segment.alive(0)
        assert not segment.alive(1)
        assert not segment.alive(2)
    finally:
        segment.unlink()
