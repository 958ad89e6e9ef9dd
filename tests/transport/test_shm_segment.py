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


def _squat(name: str, mode: int, uid: int | None = None) -> None:
    """A file another process made under the name first (issue 24)."""
    fd = os.open("/dev/shm" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
    try:
        os.fchmod(fd, mode)  # past the umask
        os.ftruncate(fd, 1 << 20)
        if uid is not None:
            os.fchown(fd, uid, -1)
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", [0o666, 0o640, 0o604, 0o700])
def test_a_squatted_name_with_other_mode_bits_is_not_attached(mode):
    name = _name()
    _squat(name, mode)
    try:
        with pytest.raises(_C.ShmError, match=rf"with mode 0{mode:o}, but this process .* of mode 0600: not attaching"):
            _C.ShmSegment.attach(name, "t", [0, 1], 1, 4096, 5.0)
        # The creator cannot take it either: O_EXCL.
        with pytest.raises(_C.ShmError, match="cannot create shared-memory segment"):
            _C.ShmSegment.create(name, "t", [0, 1], 0, 4096, 5.0)
    finally:
        os.unlink("/dev/shm" + name)


def test_a_squatted_name_of_another_user_is_not_attached():
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file owned by another uid")
    name = _name()
    _squat(name, 0o600, uid=65534)
    try:
        with pytest.raises(_C.ShmError, match=r"is owned by uid 65534 with mode 0600, but this process \(euid 0\)"):
            _C.ShmSegment.attach(name, "t", [0, 1], 1, 4096, 5.0)
    finally:
        os.unlink("/dev/shm" + name)


def test_the_abort_word_names_the_member_and_its_message():
    name = _name()
    segment = _C.ShmSegment.create(name, "t", [4, 7], 0, 4096, 5.0)
    try:
        peer = _C.ShmSegment.attach(name, "t", [4, 7], 1, 4096, 5.0)
        assert not segment.aborted and not peer.aborted
        peer.mark_aborted("x" * 2000)  # longer than a slot: cut, not overrun
        assert segment.aborted
        report = segment.abort_report()
        assert report.startswith("group rank 1 (global rank 7) failed: xxx")
        assert len(report) < 600
        segment.mark_aborted("second")
        assert "group rank 0 (global rank 4) failed: second" in segment.abort_report()
    finally:
        segment.unlink()


def test_segment_bytes_follow_the_documented_formula():
    from alltoall.transport import segment_bytes

    def ceil(n: int, a: int) -> int:
        return (n + a - 1) // a * a

    for p, ring in [(2, 4096), (8, 256 * 1024), (16, 256 * 1024), (64, 16384)]:
        header = ceil(ceil(104 + 8 * p, 64) + 512 * p, 4096)
        assert segment_bytes(p, ring) == header + ceil(128 * p + 128 * p * p + p * p * ring, 4096)
    assert segment_bytes(8, 256 * 1024) < 17 * 2**20
