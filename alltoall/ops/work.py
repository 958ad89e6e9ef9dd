"""Handles of asynchronous exchanges, in the manner of torch's ``Work``.

An exchange issued with ``async_op=True`` is queued on its Communicator's
progress thread (``_C.ProgressThread``, one FIFO worker per Communicator),
which runs it off the calling thread with the GIL released. Everything a
Communicator runs, synchronous or not, goes through that queue, so exchanges
complete in issue order on every rank.

The handle's ``wait()`` returns the result on the caller's thread, or raises
the exchange's error there. When the input required grad (and grad mode was
on at issue), the result is attached to the input's autograd graph at
``wait()``: its backward is the inverse exchange.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from alltoall._library import _C


class Work:
    """An exchange in flight.

    ``wait()`` blocks until it has run and returns what the synchronous call
    returns (a tensor, or ``(tensor, splits)``), or raises its error; later
    calls return the same result. ``is_completed()`` does not block. The
    input must not be modified before ``wait()`` returns. Dropping a handle
    without waiting is allowed: the exchange still runs, in order, and its
    result is discarded.

    The exchange holds a reference to its input until ``wait()`` (or an
    ``is_completed()`` that returns True) releases it on the caller's
    thread; for a handle dropped unwaited, the Communicator's next call or
    ``synchronize()`` does. The progress thread itself never releases it:
    a tensor's last reference may need the GIL, which it never takes.
    """

    def __init__(self, native: _C.Work, finish: Callable[[torch.Tensor, list[int]], Any]) -> None:
        self.native = native
        self._finish: Callable[[torch.Tensor, list[int]], Any] | None = finish
        self._result: Any = None

    def is_completed(self) -> bool:
        """Whether the exchange has run (successfully or not)."""
        return self.native.is_completed()

    def wait(self) -> Any:
        """The result; raises the exchange's error on this thread."""
        if self._finish is not None:
            out, splits = self.native.wait()
            self._result = self._finish(out, list(splits))
            self._finish = None
        return self._result

    def span_us(self) -> tuple[int, int]:
        """When the exchange started and finished on the progress thread
        (steady-clock microseconds; 0 while not yet, or when it ran inline)."""
        return tuple(self.native.span_us)  # type: ignore[return-value]


class Arrived(torch.autograd.Function):
    """Attaches a result computed off-thread to its input's autograd graph.

    Forward returns ``holder[0]`` unchanged; backward runs
    ``backward(grad)``, the inverse exchange.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, holder: list[torch.Tensor],  # type: ignore[override]
                backward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.inverse = backward
        return holder[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return ctx.inverse(grad.contiguous()), None, None


def needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def attach(x: torch.Tensor, out: torch.Tensor, backward: Callable[[torch.Tensor], torch.Tensor],
           grad: bool) -> torch.Tensor:
    """``out`` as a differentiable function of ``x`` when ``grad``."""
    if not grad:
        return out
    with torch.enable_grad():
        return Arrived.apply(x, [out], backward)
