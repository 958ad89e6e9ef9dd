"""Cost profiles: what a message and a byte cost on each class of link (layer 2).

A profile describes one system: for every link class the plans' phases run
on, a fixed cost per phase (``phase_us``: one collective call on a transport,
and on an oversubscribed CPU host the wait for every rank to be scheduled),
a per-message cost alpha (microseconds) and a bandwidth (GB/s, 1e9 bytes
per second), with a second bandwidth above the message size where the
transport changes protocol (``large_bytes``, ``large_gbps``); the cost of
one local copy pass (the reorders between phases); and
which class carries messages between two ranks of one node and between
nodes. ``alltoall-bench --calibrate`` fits one on the running job; shipped
profiles (``alltoall/plan/profiles/*.json``) describe published GPU systems.

Link classes are the names ``Communicator.links`` gives each phase:
"shm" (the shared-memory transport), "loopback" (c10d over gloo, all
members on one host), "tcp" (c10d over gloo across hosts), "nvlink" (c10d
over NCCL, all members on one host) and "net" (c10d over NCCL across hosts).

A class may be marked ``overlap``: its bytes move while its fixed costs are
paid, so a phase on it costs the larger of the two rather than their sum
(a shaped network link drains one rank's messages while the CPUs, shared
by the ranks, run the others' calls).

Files are JSON (``alltoall-profile/1``)::

    {"schema": "alltoall-profile/1", "name": "...", "description": "...",
     "links": {"shm": {"alpha_us": 4.1, "gbps": 3.2, "phase_us": 300.0,
                       "large_bytes": 65536, "large_gbps": 6.0}, "tcp": {...}},
     "copy": {"alpha_us": 1.0, "gbps": 5.0},
     "intra_node": "shm", "inter_node": "tcp",
     "sources": ["..."], "fit": {...}}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

SCHEMA = "alltoall-profile/1"
LINK_CLASSES = ("shm", "loopback", "tcp", "nvlink", "net")
PROFILE_ENV = "ALLTOALL_PROFILE"
# ALLTOALL_PROFILE=off: no profile even when the default file exists.
DISABLED = ("off", "none", "0")
SHIPPED_PACKAGE = "alltoall.plan.profiles"


@dataclass(frozen=True)
class LinkCost:
    """What a phase on one link class costs: ``phase_us`` once per phase (the
    collective call, and on an oversubscribed host the wait for every member
    to be scheduled), ``alpha_us`` per message, and every byte at ``gbps``
    (1e9 B/s), or at ``large_gbps`` for messages of at least ``large_bytes``
    bytes when the transport switches protocol there (shared memory: ring
    below ``ALLTOALL_SHM_SINGLE_COPY_BYTES``, single copy from it on).
    ``large_bytes`` 0: one protocol at every size. ``overlap``: a phase
    costs max(fixed, bytes) on this class instead of fixed + bytes (see the
    module docstring)."""

    alpha_us: float
    gbps: float
    phase_us: float = 0.0
    large_bytes: int = 0
    large_gbps: float | None = None
    overlap: bool = False

    def __post_init__(self) -> None:
        if not self.alpha_us >= 0:
            raise ValueError(f"alpha_us must be >= 0, got {self.alpha_us}")
        if not self.gbps > 0:
            raise ValueError(f"gbps must be > 0, got {self.gbps}")
        if not self.phase_us >= 0:
            raise ValueError(f"phase_us must be >= 0, got {self.phase_us}")
        if self.large_bytes < 0:
            raise ValueError(f"large_bytes must be >= 0, got {self.large_bytes}")
        if self.large_gbps is not None and not self.large_gbps > 0:
            raise ValueError(f"large_gbps must be > 0, got {self.large_gbps}")

    @property
    def us_per_byte(self) -> float:
        return 1.0 / (self.gbps * 1e3)

    def gbps_for(self, message_bytes: float | None) -> float:
        """The bandwidth that messages of ``message_bytes`` bytes see."""
        large = (self.large_bytes > 0 and self.large_gbps is not None and message_bytes is not None
                 and message_bytes >= self.large_bytes)
        return self.large_gbps if large else self.gbps  # type: ignore[return-value]

    def time_us(self, messages: float, nbytes: float, message_bytes: float | None = None) -> float:
        """``messages`` messages carrying ``nbytes`` in all, each of
        ``message_bytes`` (default: the small-message protocol)."""
        return messages * self.alpha_us + nbytes / (self.gbps_for(message_bytes) * 1e3)

    def to_json(self) -> dict:
        doc = {"alpha_us": self.alpha_us, "gbps": self.gbps}
        if self.phase_us:
            doc["phase_us"] = self.phase_us
        if self.large_bytes and self.large_gbps is not None:
            doc["large_bytes"], doc["large_gbps"] = self.large_bytes, self.large_gbps
        if self.overlap:
            doc["overlap"] = True
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> LinkCost:
        large = doc.get("large_gbps")
        overlap = doc.get("overlap", False)
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be true or false, got {overlap!r}")
        return cls(float(doc["alpha_us"]), float(doc["gbps"]), float(doc.get("phase_us", 0.0)),
                   int(doc.get("large_bytes", 0)), None if large is None else float(large), overlap)


@dataclass(frozen=True)
class Profile:
    """Per-link-class costs of one system; see the module docstring."""

    links: dict[str, LinkCost]
    copy: LinkCost
    intra_node: str
    inter_node: str
    name: str = "unnamed"
    description: str = ""
    sources: tuple[str, ...] = ()
    fit: dict | None = None
    path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        unknown = [k for k in self.links if k not in LINK_CLASSES]
        if unknown:
            raise ValueError(f"profile {self.name!r}: unknown link classes {unknown}; "
                             f"expected some of {', '.join(LINK_CLASSES)}")
        for role, cls in (("intra_node", self.intra_node), ("inter_node", self.inter_node)):
            if cls not in self.links:
                raise ValueError(f"profile {self.name!r}: {role}={cls!r} has no entry in links "
                                 f"(it has {', '.join(self.links) or 'none'})")

    def link(self, cls: str) -> LinkCost:
        """The cost of a link class; ValueError naming it when absent."""
        try:
            return self.links[cls]
        except KeyError:
            raise ValueError(f"profile {self.name!r} has no link class {cls!r} (it has {', '.join(self.links)}); "
                             f"calibrate it with alltoall-bench --calibrate on this system") from None

    def to_json(self) -> dict:
        doc = {
            "schema": SCHEMA,
            "name": self.name,
            "description": self.description,
            "links": {k: v.to_json() for k, v in sorted(self.links.items())},
            "copy": self.copy.to_json(),
            "intra_node": self.intra_node,
            "inter_node": self.inter_node,
            "sources": list(self.sources),
        }
        if self.fit is not None:
            doc["fit"] = self.fit
        return doc

    @property
    def hash(self) -> str:
        """sha256 (16 hex digits) of everything a prediction reads: links,
        copy and the two node classes. Names and notes do not count."""
        keys = ("links", "copy", "intra_node", "inter_node")
        decisive = {k: v for k, v in self.to_json().items() if k in keys}
        text = json.dumps(decisive, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, doc: dict, path: str | None = None) -> Profile:
        where = path or "profile"
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"{where}: schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
        try:
            links = {k: LinkCost.from_json(v) for k, v in doc["links"].items()}
            copy = LinkCost.from_json(doc["copy"])
            if float(doc.get("phase_us", 0.0)):
                raise ValueError(f"{where}: a profile-wide phase_us is no longer read; give each link class its "
                                 f"own (links.CLASS.phase_us), or calibrate again")
            return cls(links=links, copy=copy, intra_node=doc["intra_node"], inter_node=doc["inter_node"],
                       name=doc.get("name", "unnamed"), description=doc.get("description", ""),
                       sources=tuple(doc.get("sources", ())), fit=doc.get("fit"), path=path)
        except (KeyError, TypeError) as error:
            raise ValueError(f"{where}: missing or malformed field {error}") from None

    def save(self, path: str | os.PathLike) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(target)  # readers never see half a file


def default_path() -> Path:
    """Where --calibrate writes and "auto" looks when ALLTOALL_PROFILE is unset:
    $XDG_CACHE_HOME/alltoall/profile.json (default ~/.cache/...)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "alltoall" / "profile.json"


def shipped_names() -> list[str]:
    """Names of the profiles shipped with the package."""
    return sorted(p.name[:-5] for p in resources.files(SHIPPED_PACKAGE).iterdir() if p.name.endswith(".json"))


def load(spec: str | os.PathLike) -> Profile:
    """A profile from a file path, or a shipped profile by name."""
    text = str(spec)
    if not os.path.exists(text) and text in shipped_names():
        resource = resources.files(SHIPPED_PACKAGE) / f"{text}.json"
        return Profile.from_json(json.loads(resource.read_text()), path=f"shipped:{text}")
    try:
        with open(text) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"profile {text!r}: no such file, and not a shipped profile "
                         f"({', '.join(shipped_names())})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"profile {text!r} is not valid JSON: {error}") from None
    return Profile.from_json(doc, path=text)


def output_path() -> Path:
    """Where a calibration writes: ALLTOALL_PROFILE when it names a file, else the default path."""
    spec = os.environ.get(PROFILE_ENV, "").strip()
    if spec and spec.lower() not in DISABLED and spec not in shipped_names():
        return Path(spec)
    return default_path()


def active() -> Profile | None:
    """The profile "auto" uses: ALLTOALL_PROFILE (a path or a shipped name;
    "off" for none), else the default path when that file exists, else None."""
    spec = os.environ.get(PROFILE_ENV, "").strip()
    if spec.lower() in DISABLED:
        return None
    if spec:
        return load(spec)
    path = default_path()
    return load(path) if path.exists() else None
