"""Autograd functions over the C++ executor (layer 4). The backward of an
all-to-all is the inverse exchange: the same exchange for equal splits, the
exchange with input and output splits swapped for uneven ones."""

from __future__ import annotations

import torch

from alltoall._library import _C
from alltoall.ops.work import Work, attach, needs_grad


class AllToAll(torch.autograd.Function):
    """Equal-split all-to-all: [p*n, *] -> [p*n, *], block s from rank s."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, exchanger: _C.Exchanger) -> torch.Tensor:  # type: ignore[override]
        ctx.exchanger = exchanger
        return exchanger.all_to_all(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ctx.exchanger.all_to_all(grad.contiguous()), None


class AllToAllV(torch.autograd.Function):
    """Uneven all-to-all: [sum(input_splits), *] -> [sum(output_splits), *].

    Returns the output and, as a non-differentiable int64 tensor, the output
    splits (exchanged with the data when not given).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        exchanger: _C.Exchanger,
        input_splits: list[int],
        output_splits: list[int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, received = exchanger.all_to_all_v(x, input_splits, output_splits)
        ctx.exchanger = exchanger
        ctx.splits = (list(input_splits), list(received))
        splits = torch.tensor(received, dtype=torch.int64)
        ctx.mark_non_differentiable(splits)
        return out, splits

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _splits_grad: object) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        input_splits, output_splits = ctx.splits
        grad_in, _ = ctx.exchanger.all_to_all_v(grad.contiguous(), output_splits, input_splits)
        return grad_in, None, None, None


# Function.apply costs about 10 us of CPU per call even when nothing needs a
# gradient (measured with alltoall-bench's overhead check, docs/bench.md); on
# oversubscribed hosts that is paid once per rank per exchange. These skip it
# when no gradient can flow, and are otherwise AllToAll(V).apply.


def all_to_all(x: torch.Tensor, exchanger: _C.Exchanger) -> torch.Tensor:
    """``AllToAll.apply(x, exchanger)``, without autograd when not needed."""
    if torch.is_grad_enabled() and x.requires_grad:
        return AllToAll.apply(x, exchanger)
    return exchanger.all_to_all(x)


def all_to_all_v(
    x: torch.Tensor, exchanger: _C.Exchanger, input_splits: list[int], output_splits: list[int] | None
) -> tuple[torch.Tensor, list[int]]:
    """``AllToAllV.apply`` with the received splits as a list, without
    autograd when not needed."""
    if torch.is_grad_enabled() and x.requires_grad:
        out, received = AllToAllV.apply(x, exchanger, input_splits, output_splits)
        return out, received.tolist()
    out, received = exchanger.all_to_all_v(x, input_splits, output_splits)
    return out, list(received)


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
