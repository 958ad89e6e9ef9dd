"""Autograd of the asynchronous exchanges (layer 4). The backward of an
all-to-all is the inverse exchange: the same exchange for equal splits, the
exchange with input and output splits swapped for uneven ones.

The synchronous calls record their autograd node in C++, in the same call
that runs the exchange (``_C.CallPath``, csrc/ops/exchange_autograd.cpp):
``torch.autograd.Function.apply`` alone cost 10 to 35 us of CPU per call
(docs/bench.md). An asynchronous exchange's result arrives at ``wait()``,
where ``alltoall.ops.work.attach`` joins it to the input's graph.
"""

from __future__ import annotations

import torch

from alltoall._library import _C
from alltoall.ops.work import Work, attach, needs_grad


def all_to_all_async(x: torch.Tensor, exchanger: _C.Exchanger) -> Work:
    """``all_to_all`` queued on the exchanger's progress thread; the result
    is differentiable in ``x`` when ``x`` requires grad."""
    grad = needs_grad(x)
    native = exchanger.all_to_all_async(x.detach())
    return Work(native, lambda out, _: attach(x, out, exchanger.all_to_all, grad))


def all_to_all_v_async(
    x: torch.Tensor, exchanger: _C.Exchanger, input_splits: list[int], output_splits: list[int] | None,
    with_splits: bool,
) -> Work:
    """``all_to_all_v`` queued; ``wait()`` gives the output, or ``(output,
    received splits)`` when ``with_splits``."""
    grad = needs_grad(x)
    native = exchanger.all_to_all_v_async(x.detach(), input_splits, output_splits)

    def finish(out: torch.Tensor, received: list[int]) -> object:
        out = attach(x, out, lambda g: exchanger.all_to_all_v(g, received, input_splits)[0], grad)
        return (out, received) if with_splits else out

    return Work(native, finish)
