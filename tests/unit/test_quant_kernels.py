"""The FP8 wire-format kernels (torch.ops.alltoall.quantize_fp8 and
dequantize_fp8) against a plain PyTorch reference of the same rule
(csrc/kernels/quant_element.h), bit for bit: the packed bytes, and the
values read back."""

from __future__ import annotations

import math

import pytest
import torch

import alltoall  # noqa: F401  (registers torch.ops.alltoall)
from tests.harness.devices import DEVICES

ops = torch.ops.alltoall
BLOCK = 128
FP8_MAX = 448.0
SIZES = [1, 127, 128, 129, 4096]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def packed_bytes(cols: int) -> int:
    return cols + 4 * math.ceil(cols / BLOCK)


def reference_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 values [*, M], float32 scales [*, B]) by the rule: per token and
    block of 128 channels, scale = amax / 448 (NaN when the block holds NaN
    or inf); value = e4m3fn(clamp(x / scale, -448, 448)), +0 when scale is 0."""
    cols = x.shape[-1]
    blocks = math.ceil(cols / BLOCK)
    xf = torch.nn.functional.pad(x.float(), (0, blocks * BLOCK - cols)).reshape(*x.shape[:-1], blocks, BLOCK)
    amax = xf.abs().amax(-1)
    scale = torch.where(torch.isfinite(amax), amax / FP8_MAX, torch.full_like(amax, float("nan")))
    s = scale.unsqueeze(-1)
    q = torch.where(s == 0, torch.zeros_like(xf), xf / s).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn).reshape(*x.shape[:-1], blocks * BLOCK)[..., :cols], scale


def reference_pack(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.cat([q.view(torch.uint8), scale.contiguous().view(torch.uint8)], dim=-1)


def reference_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cols = q.shape[-1]
    per_value = scale.repeat_interleave(BLOCK, dim=-1)[..., :cols]
    return (q.float() * per_value).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so -0 and +0 differ; NaNs are made one NaN first (the
    rule says which values are NaN, not their sign or payload)."""
    if t.is_floating_point():
        t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_round_trip_matches(x: torch.Tensor, device: str) -> torch.Tensor:
    q, scale = reference_quantize(x)
    packed = ops.quantize_fp8(x.to(device))
    assert packed.dtype == torch.uint8 and packed.shape == (*x.shape[:-1], packed_bytes(x.shape[-1]))
    assert torch.equal(packed.cpu(), reference_pack(q, scale)), "packed bytes differ from the reference"
    back = ops.dequantize_fp8(packed, x.shape[-1], x.dtype)
    assert back.dtype == x.dtype and back.shape == x.shape and back.device.type == device
    assert torch.equal(bits(back.cpu()), bits(reference_dequantize(q, scale, x.dtype)))
    return back.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_rows_match_the_reference(device, cols, dtype):
    g = torch.Generator().manual_seed(cols)
    # Rows of very different magnitudes, so blocks get very different scales.
    decades = 3 if dtype == torch.float16 else 6  # float16 overflows past 65504
    x = (torch.randn(6, cols, generator=g) * torch.logspace(-decades, decades, 6).unsqueeze(1)).to(dtype)
    back = assert_round_trip_matches(x, device)
    # The rule's error bound (docs/api.md): half an e4m3 step of the scaled
    # value, at most 2^-4 of the block's amax; then the output dtype's own
    # rounding, half an ulp (u = 2^-8 bf16, 2^-11 fp16) of a value at most
    # amax * (1 + 2^-4); 2^-20 covers float32's roundings of x / s and q * s.
    _, scale = reference_quantize(x)
    amax = scale.repeat_interleave(BLOCK, dim=-1)[..., :cols].double() * FP8_MAX
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(dtype, 0.0)
    assert ((back.double() - x.double()).abs() <= amax * (2.0**-4 + u * (1 + 2.0**-4) + 2.0**-20)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols", SIZES)
def test_zeros_give_zero_scales_and_zeros(device, cols):
    x = torch.zeros(3, cols)
    x[1] = -0.0
    back = assert_round_trip_matches(x, device)
    assert torch.equal(bits(back), bits(torch.zeros(3, cols)))  # -0 reads back as +0
    scales = ops.quantize_fp8(x.to(device)).cpu()[..., cols:].contiguous().view(torch.float32)
    assert torch.equal(bits(scales), bits(torch.zeros_like(scales)))


@pytest.mark.parametrize("device", DEVICES)
def test_denormals(device):
    tiny = torch.finfo(torch.float32).smallest_normal
    x = torch.stack([
        torch.full((129,), tiny / 8),                    # float32 denormals: scale amax / 448 is denormal too
        torch.linspace(-tiny, tiny, 129),                  # a mix around 0
        torch.full((129,), 1e-45),                         # the smallest denormal: amax / 448 underflows to 0
        torch.cat([torch.full((128,), 1.0), torch.full((1,), 2.0**-140)]),  # e4m3 denormals after scaling
    ])
    back = assert_round_trip_matches(x, device)
    assert torch.isfinite(back).all()
    assert torch.equal(back[2], torch.zeros(129))


@pytest.mark.parametrize("device", DEVICES)
def test_values_at_and_beyond_448_saturate_never_nan(device):
    big = torch.finfo(torch.float32).max
    x = torch.tensor([[448.0, -448.0, 449.0, -1e6, big, -big, 1.0, 0.0] * 20])
    back = assert_round_trip_matches(x, device)
    assert torch.isfinite(back).all()
    # The block's amax is float32's max: it comes back as the largest e4m3 times its scale.
    assert back[0, 4] == torch.tensor(big) and back[0, 5] == -torch.tensor(big)
    # A scaled value beyond 448 (a denormal scale rounds it up) saturates too.
    y = torch.full((1, 5), torch.finfo(torch.float32).smallest_normal / 3)
    assert torch.isfinite(assert_round_trip_matches(y, device)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_propagate_to_their_block(device, bad):
    x = torch.randn(2, 300)
    x[0, 130] = bad  # block 1 of row 0
    back = assert_round_trip_matches(x, device)
    assert torch.isnan(back[0, 128:256]).all(), "the block holding the non-finite value reads back as NaN"
    assert torch.isfinite(back[0, :128]).all() and torch.isfinite(back[0, 256:]).all() and torch.isfinite(back[1]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_empty_rows_and_transposed_input(device):
    g = torch.Generator().manual_seed(3)
    assert_round_trip_matches(torch.randn(2, 3, 200, generator=g), device)
    assert_round_trip_matches(torch.randn(0, 200), device)
    assert_round_trip_matches(torch.randn(4, 0), device)
    t = torch.randn(300, 5, generator=g).t()
    assert not t.is_contiguous()
    assert_round_trip_matches(t, device)


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_to_another_dtype(device):
    x = torch.randn(4, 257, generator=torch.Generator().manual_seed(5))
    q, scale = reference_quantize(x)
    packed = ops.quantize_fp8(x.to(device))
    for dtype in DTYPES:
        got = ops.dequantize_fp8(packed, 257, dtype).cpu()
        assert torch.equal(bits(got), bits(reference_dequantize(q, scale, dtype)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(7)
    for x in (torch.randn(5, 130, generator=g), torch.randn(2, 3, 7, generator=g),
              torch.randn(130, 5, generator=g).t(), torch.randn(4, 128, generator=g).bfloat16()):
        x = x.to(device)
        torch.library.opcheck(ops.quantize_fp8, (x,))
        packed = ops.quantize_fp8(x)
        torch.library.opcheck(ops.dequantize_fp8, (packed, x.shape[-1], torch.float32))
        torch.library.opcheck(ops.dequantize_fp8, (packed, x.shape[-1], torch.bfloat16))


def test_bad_arguments_raise_value_errors():
    packed = ops.quantize_fp8(torch.randn(2, 129))
    cases = [
        (lambda: ops.quantize_fp8(torch.ones(3, dtype=torch.int32)), "got Int"),
        (lambda: ops.quantize_fp8(torch.tensor(1.0)), "0-d"),
        (lambda: ops.dequantize_fp8(packed, 128, torch.float32), "packed rows hold 137 bytes but cols=128"),
        (lambda: ops.dequantize_fp8(packed.float(), 129, torch.float32), "must be uint8"),
        (lambda: ops.dequantize_fp8(packed, 129, torch.int64), "got Long"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_every_e4m3_value_decodes_as_torch_does(device):
    # Packed rows of 128 values with scale 1.0: every byte, both signs.
    values = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(2, 128)
    packed = torch.cat([values, torch.ones(2, 1).view(torch.uint8)], dim=1)
    got = ops.dequantize_fp8(packed.to(device), 128, torch.float32).cpu()
    assert torch.equal(bits(got), bits(values.view(torch.float8_e4m3fn).float()))


@pytest.mark.parametrize("device", DEVICES)
def test_a_sweep_of_float32_encodes_as_torch_does(device):
    # Rows led by 448, so the scale is exactly 1 and the stored bytes are
    # e4m3(x) itself: 2^20 float32 bit patterns spread over [0, 448] (normal
    # and denormal e4m3 ranges, every rounding tie class), both signs.
    top = 0x43E00000  # 448.0
    patterns = torch.linspace(0, top, 127 * 8192, dtype=torch.float64).round().to(torch.int64).to(torch.int32)
    x = patterns.view(torch.float32).view(-1, 127)
    x = torch.cat([torch.full((x.shape[0], 1), 448.0), x], dim=1)
    x = torch.cat([x, -x])
    packed = ops.quantize_fp8(x.to(device)).cpu()
    assert torch.equal(packed[:, 128:].contiguous().view(torch.float32), torch.ones(x.shape[0], 1))
    assert torch.equal(packed[:, :128], x.to(torch.float8_e4m3fn).view(torch.uint8))
