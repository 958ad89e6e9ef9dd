"""The equal-split exchange as a torch custom op, so torch.compile can trace
through it (``torch.ops.alltoall.exchange_equal``).

The op takes the exchanger by key, a string, since compiled graphs carry
only tensors and plain values. Communicators register their exchangers here
when built; the op's fake implementation gives the output shape (the
input's, contiguous), and its backward is the same exchange. Eager calls do not use it:
``Communicator.all_to_all`` calls the executor directly, which costs less
per call; only code being compiled goes through the op.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from alltoall._library import _C

_exchangers: weakref.WeakValueDictionary[str, _C.Exchanger] = weakref.WeakValueDictionary()
_next = itertools.count()


def register(exchanger: _C.Exchanger) -> str:
    """A key naming ``exchanger`` for the op, for as long as it lives."""
    key = f"exchanger-{next(_next)}"
    _exchangers[key] = exchanger
    return key


def _lookup(key: str) -> _C.Exchanger:
    exchanger = _exchangers.get(key)
    if exchanger is None:
        raise ValueError(f"no live exchanger {key!r}: its Communicator was garbage-collected")
    return exchanger


# Not capture-safe: each phase copies host offsets to the device and waits on
# the host for the transport. The tag makes inductor's graph partitioning run
# the op outside a CUDA graph under mode="reduce-overhead".
@torch.library.custom_op("alltoall::exchange_equal", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def exchange_equal(x: torch.Tensor, key: str) -> torch.Tensor:
    """Equal-split all-to-all of ``x`` ``[p*n, *]`` by the exchanger ``key``."""
    return _lookup(key).all_to_all(x)


@exchange_equal.register_fake
def _(x: torch.Tensor, key: str) -> torch.Tensor:
    # The executor returns a new contiguous tensor whatever x's strides are.
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    return exchange_equal(grad.contiguous(), ctx.key), None


def _setup(ctx, inputs, output) -> None:
    ctx.key = inputs[1]


exchange_equal.register_autograd(_backward, setup_context=_setup)
