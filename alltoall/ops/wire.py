"""Low-precision wire formats for exchanges (layer 4): encode before a row
movement, decode after it, with a straight-through gradient.

Formats (``wire_dtype``):

- ``None``: the tensor's own dtype, untouched.
- ``torch.bfloat16``: a cast on each side.
- ``torch.float8_e4m3fn``: per token (a row of the last dim, M channels)
  and per block of 128 channels, scale = amax / 448; the values are stored as
  saturating e4m3 and each row is packed as uint8 ``[M fp8 values |
  ceil(M / 128) float32 scales]`` (``torch.ops.alltoall.quantize_fp8``, rule
  in csrc/kernels/quant_element.h), so the scales travel in the same
  messages as their rows. Finite input never gives NaN; NaN or inf in a
  block makes that whole block NaN after decoding.

A row movement (an exchange, a dispatch) only moves dim 0 and keeps the
trailing shape, so it can carry the encoded tensor whatever its dtype.
``low_precision`` wraps such a movement in autograd: forward =
decode(move_forward(encode(x))); backward = move_backward(the gradient in
``grad_dtype``), cast back to x's dtype. Quantization is treated as the
identity in the gradient (straight-through): the gradient of the rounding
itself is not modelled, only the movement's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from alltoall._library import _C  # noqa: F401  (registers torch.ops.alltoall.*)

FP8 = torch.float8_e4m3fn
WIRE_DTYPES = (torch.bfloat16, FP8)
BLOCK = 128
FP8_MAX = 448.0

Move = Callable[[torch.Tensor], torch.Tensor]


def _name(dtype: object) -> str:
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else repr(dtype)


def check_wire_dtype(wire_dtype: object, op: str, name: str = "wire_dtype",
                     allowed: tuple[torch.dtype, ...] = WIRE_DTYPES) -> None:
    """ValueError naming the value unless it is None or one of ``allowed``."""
    if wire_dtype is None or wire_dtype in allowed:
        return
    choices = ", ".join(["None", *(f"torch.{_name(d)}" for d in allowed)])
    raise ValueError(f"{op}: {name}={_name(wire_dtype)} is not supported; use one of {choices}")


def check_input(x: object, wire_dtype: torch.dtype | None, op: str, name: str = "wire_dtype") -> None:
    """The input can travel in ``wire_dtype``: a floating tensor (ValueError
    naming the dtype for integer, bool or complex inputs)."""
    if wire_dtype is None or not isinstance(x, torch.Tensor):
        return
    if not x.is_floating_point() or x.dtype in (FP8, torch.float8_e5m2):
        raise ValueError(f"{op}: {name}={_name(wire_dtype)} needs a float16, bfloat16, float32 or float64 "
                         f"input, got {_name(x.dtype)}")


def encode(x: torch.Tensor, wire_dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` in its wire format: ``[*, M]`` -> ``[*, M]`` (None, bfloat16) or
    ``[*, M + 4 * ceil(M / 128)]`` uint8 (float8_e4m3fn). A 1-d input is
    rows of one channel: ``[N]`` -> ``[N, 5]`` bytes for FP8."""
    if wire_dtype is None:
        return x
    if wire_dtype == torch.bfloat16:
        return x.to(torch.bfloat16)
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    return torch.ops.alltoall.quantize_fp8(x)


def decode(y: torch.Tensor, wire_dtype: torch.dtype | None, like: torch.Tensor) -> torch.Tensor:
    """The inverse of ``encode``, to ``like``'s dtype and trailing shape
    (``y`` may have another dim 0: rows were moved)."""
    if wire_dtype is None:
        return y
    if wire_dtype == torch.bfloat16:
        return y.to(like.dtype)
    cols = like.shape[-1] if like.dim() > 1 else 1
    out = torch.ops.alltoall.dequantize_fp8(y, cols, like.dtype)
    return out.squeeze(-1) if like.dim() == 1 else out


def row_bytes(cols: int, dtype: torch.dtype, wire_dtype: torch.dtype | None) -> int:
    """Bytes one row of ``cols`` channels of ``dtype`` takes on the wire."""
    if wire_dtype is None:
        return cols * dtype.itemsize
    if wire_dtype == torch.bfloat16:
        return cols * 2
    return cols + 4 * math.ceil(cols / BLOCK)


def round_trip(x: torch.Tensor, wire_dtype: torch.dtype | None) -> torch.Tensor:
    """``decode(encode(x))``: what a receiver gets for ``x``, without moving it."""
    return decode(encode(x, wire_dtype), wire_dtype, x)


def carried(move: Move, t: torch.Tensor, wire_dtype: torch.dtype | None) -> torch.Tensor:
    """``decode(move(encode(t)))``, no autograd: one movement of ``t`` in a
    wire format. For the steps of a movement that sums between its
    exchanges, so every sum runs in ``t``'s dtype."""
    return decode(move(encode(t, wire_dtype)), wire_dtype, t)


class LowPrecision(torch.autograd.Function):
    """decode(move_forward(encode(x))) with a straight-through backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, move_forward: Move, move_backward: Move,  # type: ignore[override]
                wire_dtype: torch.dtype | None, grad_dtype: torch.dtype | None) -> torch.Tensor:
        ctx.move_backward = move_backward
        ctx.grad_dtype = grad_dtype
        ctx.like = torch.empty((0, *x.shape[1:]), dtype=x.dtype, device=x.device)
        return decode(move_forward(encode(x, wire_dtype)), wire_dtype, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        like = ctx.like
        g = grad.to(like.dtype).contiguous()
        return decode(ctx.move_backward(encode(g, ctx.grad_dtype)), ctx.grad_dtype, like), None, None, None, None


def low_precision(move_forward: Move, move_backward: Move, x: torch.Tensor, wire_dtype: torch.dtype | None,
                  grad_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A row movement carried in a low-precision wire format, with autograd.

    Args:
        move_forward: moves rows (dim 0) of a tensor of any dtype, keeping
            its trailing shape: ``[N, *] -> [N', *]``.
        move_backward: the adjoint movement, ``[N', *] -> [N, *]``.
        x: ``[N, *, M]``, floating.
        wire_dtype: None, torch.bfloat16 or torch.float8_e4m3fn (see the
            module docstring).
        grad_dtype: the wire format of the gradient in the backward; None
            means x's dtype, uncompressed. FP8 only when asked: gradients
            span more magnitudes than activations, so per-block scaling of
            them needs its own care.

    Returns:
        ``[N', *, M]`` in x's dtype. The gradient with respect to x is
        ``move_backward`` of the incoming gradient (carried in
        ``grad_dtype``), cast to x's dtype: the rounding counts as identity.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return LowPrecision.apply(x, move_forward, move_backward, wire_dtype, grad_dtype)
    return decode(move_forward(encode(x, wire_dtype)), wire_dtype, x)
