"""alltoall: all-to-all collectives for Mixture-of-Experts expert parallelism."""

from alltoall._library import _C  # noqa: F401

__version__ = "0.1.0"
