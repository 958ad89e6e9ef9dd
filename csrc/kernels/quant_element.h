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

// |v| as its float32 bits, sign cleared. For such bits integer order is
// float order, and every NaN is above +inf, so the integer maximum of a
// block is its amax, NaN if any value is NaN, whatever the order of the
// reduction. Integer max also vectorises on the CPU, and -0 counts as +0.
ALLTOALL_INLINE uint32_t abs_bits(float v) { return c10::detail::fp32_to_bits(v) & 0x7FFFFFFFu; }

ALLTOALL_INLINE uint32_t max_bits(uint32_t a, uint32_t b) { return a > b ? a : b; }

// The part of a block's amax (as abs_bits) over channels lane, lane +
// lanes, ... of n. One lane (the CPU) takes a unit-stride loop.
template <typename T>
ALLTOALL_INLINE uint32_t block_amax_part(const T* x, int64_t n, int64_t lane, int64_t lanes) {
  uint32_t amax = 0;
  if (lanes == 1) {
    for (int64_t m = 0; m < n; ++m) amax = max_bits(amax, abs_bits(static_cast<float>(x[m])));
  } else {
    for (int64_t m = lane; m < n; m += lanes) amax = max_bits(amax, abs_bits(static_cast<float>(x[m])));
  }
  return amax;
}

// The block's scale from its amax bits: NaN when the block holds NaN or inf.
ALLTOALL_INLINE float block_scale(uint32_t amax_bits) {
  if (amax_bits >= 0x7F800000u) return c10::detail::fp32_from_bits(0x7FC00000u);
  return c10::detail::fp32_from_bits(amax_bits) / kFp8Max;
}

// e4m3fn bits of q, rounded to nearest even, for |q| <= 448 or NaN: the
// arithmetic of c10::detail::fp8e4m3fn_from_fp32_value without its
// overflow branch (the caller has clamped), and with both the normal and
// the denormal candidate computed and one selected, so a CPU loop of it
// vectorises (it runs at memory speed instead of a branch per value).
ALLTOALL_INLINE uint8_t fp8_bits_of_clamped(float q) {
  const uint32_t all = c10::detail::fp32_to_bits(q);
  const uint32_t sign = all & 0x80000000u;
  const uint32_t bits = all ^ sign;
  // Normal e4m3 (|q| >= 2^-6): rebias the exponent (127 -> 7) and round
  // the 23-bit mantissa to 3 bits, ties to even.
  const uint32_t normal = (bits + ((7u - 127u) << 23) + 0x7FFFFu + ((bits >> 20) & 1u)) >> 20;
  // Denormal e4m3: adding 2^-6 * 2^3 (as a float) rounds the value to a
  // multiple of 2^-9 in float32's own round-to-nearest-even, and leaves
  // the e4m3 mantissa in the low bits.
  constexpr uint32_t kDenormMagic = 141u << 23;
  const uint32_t denormal =
      c10::detail::fp32_to_bits(c10::detail::fp32_from_bits(bits) + c10::detail::fp32_from_bits(kDenormMagic)) -
      kDenormMagic;
  const uint32_t magnitude = bits > 0x7F800000u ? 0x7Fu : (bits >= (121u << 23) ? normal : denormal);
  return static_cast<uint8_t>(magnitude | (sign >> 24));
}

// One value as e4m3fn bits. Division (not a multiply by 1 / s) so the
// quotient is one correctly rounded operation on every device. A NaN scale
// gives NaN; the comparisons leave a NaN quotient unclamped.
ALLTOALL_INLINE uint8_t fp8_encode(float v, float scale) {
  float q = scale == 0.0f ? 0.0f : v / scale;
  q = q > kFp8Max ? kFp8Max : q;
  q = q < -kFp8Max ? -kFp8Max : q;
  return fp8_bits_of_clamped(q);
}

// The float32 value of e4m3fn bits (c10::detail::fp8e4m3fn_to_fp32_value's
// result, NaN payloads aside), without a count of leading zeros, so a CPU
// loop of it vectorises.
ALLTOALL_INLINE float fp8_value(uint8_t byte) {
  const uint32_t mag = byte & 0x7Fu;
  // Exponent field E > 0: 2^(E-7) (1 + M/8), float32 exponent E + 120.
  const float normal = c10::detail::fp32_from_bits((mag << 20) + (120u << 23));
  // E = 0: M * 2^-9, exact in float32.
  const float denormal = static_cast<float>(mag) * 0.001953125f;
  const uint32_t value = mag == 0x7Fu ? 0x7FC00000u : c10::detail::fp32_to_bits(mag < 8u ? denormal : normal);
  return c10::detail::fp32_from_bits(value | (static_cast<uint32_t>(byte & 0x80u) << 24));
}

ALLTOALL_INLINE float fp8_decode(uint8_t bits, float scale) { return fp8_value(bits) * scale; }

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
  const T* src = row + first;
  uint8_t* dst = packed_row + first;
  if (lanes == 1) {
    for (int64_t m = 0; m < n; ++m) dst[m] = fp8_encode(static_cast<float>(src[m]), scale);
  } else {
    for (int64_t m = lane; m < n; m += lanes) dst[m] = fp8_encode(static_cast<float>(src[m]), scale);
  }
}

// The inverse, into a row of the output dtype.
template <typename T>
ALLTOALL_INLINE void dequantize_block_values(const uint8_t* packed_row, T* row, int64_t cols, int64_t block,
                                             int64_t lane, int64_t lanes) {
  const float scale = load_scale(packed_row, cols, block);
  const int64_t first = block * kQuantBlock;
  const int64_t n = cols - first < kQuantBlock ? cols - first : kQuantBlock;
  const uint8_t* src = packed_row + first;
  T* dst = row + first;
  if (lanes == 1) {
    for (int64_t m = 0; m < n; ++m) dst[m] = static_cast<T>(fp8_decode(src[m], scale));
  } else {
    for (int64_t m = lane; m < n; m += lanes) dst[m] = static_cast<T>(fp8_decode(src[m], scale));
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
