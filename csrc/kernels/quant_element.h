// Per-element logic of the low-precision wire format, shared by the CPU loops
// and the CUDA kernels.
//
// FP8 (e4m3fn) with one scale per token and per block of 128 channels:
//   a row of M values is cut into B = ceil(M / 128) blocks (the last one may
//   be shorter); block b's scale is s = amax_b / 448, where amax_b is the
//   largest |x| of the block in float32 and 448 the largest finite e4m3fn;
//   each value is stored as e4m3fn(clamp(x / s, -448, 448)) (round to
//   nearest even), and read back as float(q) * s.
// Packed row: uint8 [M fp8 values | B float32 scales, little-endian],
// M + 4 * B bytes, so a row's scales travel in the same message as the row.
// The scales sit at byte offset M, which need not be 4-aligned: they are
// read and written a byte at a time.
//
// Edge cases, defined here and mirrored by the PyTorch reference in
// tests/unit/test_quant_kernels.py:
//   - an all-zero block (or one whose amax / 448 underflows to 0) has scale
//     0 and every value stored as +0, so it reads back as zeros;
//   - finite values never give NaN: the quotient is clamped to +-448 first
//     (a denormal scale can push x / s past 448 by rounding), so finite
//     input saturates;
//   - NaN or +-inf anywhere in a block makes that block's scale NaN, and
//     the whole block reads back as NaN: non-finite input propagates, at
//     block granularity, and nothing raises (a check would cost a
//     device-to-host sync per call on a GPU).
// Inputs of any floating dtype are first converted to float32 (a double
// beyond float32's range becomes inf, hence NaN as above).
#pragma once

#include <cstdint>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/floating_point_utils.h>

#include "common/host_device.h"

namespace alltoall::kernels {

constexpr int64_t kQuantBlock = 128;
constexpr float kFp8Max = 448.0f;

// Number of scales (blocks of kQuantBlock channels) of a row of `cols` values.
ALLTOALL_INLINE int64_t quant_blocks(int64_t cols) { return (cols + kQuantBlock - 1) / kQuantBlock; }

// Bytes of a packed row: the fp8 values, then the float32 scales.
ALLTOALL_INLINE int64_t packed_row_bytes(int64_t cols) { return cols + 4 * quant_blocks(cols); }

ALLTOALL_INLINE bool is_nan(float v) { return v != v; }

// max(a, b) that keeps a NaN from either side, so a NaN anywhere in a block
// reaches its scale whatever the order of the reduction.
ALLTOALL_INLINE float nan_max(float a, float b) { return (is_nan(a) || a > b) ? a : b; }

// |v| by clearing the sign bit, so -0 gives +0 (and the scale of a block of
// -0 is +0, as torch.abs gives).
ALLTOALL_INLINE float abs_bits(float v) { return c10::detail::fp32_from_bits(c10::detail::fp32_to_bits(v) & 0x7FFFFFFFu); }

// The part of a block's amax over channels lane, lane + lanes, ... of n.
// |inf| = inf passes through; NaN is kept by nan_max.
template <typename T>
ALLTOALL_INLINE float block_amax_part(const T* x, int64_t n, int64_t lane, int64_t lanes) {
  float amax = 0.0f;
  for (int64_t m = lane; m < n; m += lanes) amax = nan_max(amax, abs_bits(static_cast<float>(x[m])));
  return amax;
}

// The block's scale from its amax: NaN when the block holds NaN or inf.
ALLTOALL_INLINE float block_scale(float amax) {
  if (is_nan(amax) || c10::detail::fp32_to_bits(amax) == 0x7F800000u) return c10::detail::fp32_from_bits(0x7FC00000u);
  return amax / kFp8Max;
}

// One value as e4m3fn bits. Division (not a multiply by 1 / s) so the
// quotient is one correctly rounded operation on every device. A NaN scale
// gives NaN; the comparisons leave a NaN quotient unclamped.
ALLTOALL_INLINE uint8_t fp8_encode(float v, float scale) {
  if (scale == 0.0f) return 0;
  float q = v / scale;
  if (q > kFp8Max) q = kFp8Max;
  if (q < -kFp8Max) q = -kFp8Max;
  return c10::detail::fp8e4m3fn_from_fp32_value(q);
}

ALLTOALL_INLINE float fp8_decode(uint8_t bits, float scale) {
  return c10::detail::fp8e4m3fn_to_fp32_value(bits) * scale;
}

ALLTOALL_INLINE void store_scale(uint8_t* packed_row, int64_t cols, int64_t block, float scale) {
  const uint32_t bits = c10::detail::fp32_to_bits(scale);
  uint8_t* at = packed_row + cols + 4 * block;
  for (int i = 0; i < 4; ++i) at[i] = static_cast<uint8_t>(bits >> (8 * i));
}

ALLTOALL_INLINE float load_scale(const uint8_t* packed_row, int64_t cols, int64_t block) {
  const uint8_t* at = packed_row + cols + 4 * block;
  uint32_t bits = 0;
  for (int i = 0; i < 4; ++i) bits |= static_cast<uint32_t>(at[i]) << (8 * i);
  return c10::detail::fp32_from_bits(bits);
}

// Channels lane, lane + lanes, ... of block `block` of one row, given the
// block's scale: writes their fp8 bytes into the packed row.
template <typename T>
ALLTOALL_INLINE void quantize_block_values(const T* row, uint8_t* packed_row, int64_t cols, int64_t block,
                                           float scale, int64_t lane, int64_t lanes) {
  const int64_t first = block * kQuantBlock;
  const int64_t n = cols - first < kQuantBlock ? cols - first : kQuantBlock;
  for (int64_t m = lane; m < n; m += lanes) {
    packed_row[first + m] = fp8_encode(static_cast<float>(row[first + m]), scale);
  }
}

// The inverse, into a row of the output dtype.
template <typename T>
ALLTOALL_INLINE void dequantize_block_values(const uint8_t* packed_row, T* row, int64_t cols, int64_t block,
                                             int64_t lane, int64_t lanes) {
  const float scale = load_scale(packed_row, cols, block);
  const int64_t first = block * kQuantBlock;
  const int64_t n = cols - first < kQuantBlock ? cols - first : kQuantBlock;
  for (int64_t m = lane; m < n; m += lanes) {
    row[first + m] = static_cast<T>(fp8_decode(packed_row[first + m], scale));
  }
}

// A whole block by one thread (the CPU): amax, scale, values.
template <typename T>
ALLTOALL_INLINE void quantize_block(const T* row, uint8_t* packed_row, int64_t cols, int64_t block) {
  const int64_t first = block * kQuantBlock;
  const int64_t n = cols - first < kQuantBlock ? cols - first : kQuantBlock;
  const float scale = block_scale(block_amax_part(row + first, n, 0, 1));
  store_scale(packed_row, cols, block, scale);
  quantize_block_values(row, packed_row, cols, block, scale, 0, 1);
}

}  // namespace alltoall::kernels
