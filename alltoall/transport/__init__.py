"""Layer 3: transports. The C++ side (csrc/transport/) moves bytes over a
c10d ProcessGroup or over shared memory between the processes of one host;
this side names groups, creates subgroups and chooses a transport per group."""

from alltoall.transport.choice import (
    LINK_CLASSES,
    TRANSPORT_ENV,
    TRANSPORTS,
    handles_host_tensors,
    link_class,
    make_transport,
    resolve_transport,
    transport_kind,
)
from alltoall.transport.process_group import (
    DEFAULT_TIMEOUT,
    TIMEOUT_ENV,
    GroupRef,
    new_subgroups,
    resolve_timeout,
    splits_parent_communicator,
)
from alltoall.transport.shm import (
    ShmMembers,
    ShmOptions,
    abort_transports,
    create_shm_transport,
    segment_bytes,
    store_agreement,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "LINK_CLASSES",
    "TIMEOUT_ENV",
    "TRANSPORTS",
    "TRANSPORT_ENV",
    "GroupRef",
    "ShmMembers",
    "ShmOptions",
    "abort_transports",
    "create_shm_transport",
    "handles_host_tensors",
    "link_class",
    "make_transport",
    "new_subgroups",
    "resolve_timeout",
    "resolve_transport",
    "segment_bytes",
    "splits_parent_communicator",
    "store_agreement",
    "transport_kind",
]
