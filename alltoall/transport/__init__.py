"""Layer 3: transports. The C++ side (csrc/transport/) moves bytes over a
c10d ProcessGroup; this side names groups and creates subgroups."""

from alltoall.transport.process_group import (
    DEFAULT_TIMEOUT,
    TIMEOUT_ENV,
    GroupRef,
    new_subgroups,
    resolve_timeout,
    splits_parent_communicator,
)

__all__ = ["DEFAULT_TIMEOUT", "TIMEOUT_ENV", "GroupRef", "new_subgroups", "resolve_timeout",
           "splits_parent_communicator"]
