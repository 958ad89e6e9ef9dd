// The FP8 wire format as torch ops (the format: csrc/kernels/quant_element.h):
//   torch.ops.alltoall.quantize_fp8(x [*, M] floating) -> [*, M + 4 * ceil(M / 128)] uint8
//   torch.ops.alltoall.dequantize_fp8(packed [*, P] uint8, cols M, dtype) -> [*, M] of dtype
// Every row of the last dim is one token: its values and its scales pack
// into one row of bytes, so an exchange that moves rows moves both. No
// autograd here: alltoall/ops/wire.py wraps them in a straight-through
// function. Output shapes follow from the input shapes, so the Meta kernels
// need no data.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "kernels/quant.h"
#include "kernels/quant_element.h"

namespace alltoall::ops {

namespace {

c10::SymInt sym_packed_row_bytes(const c10::SymInt& cols) {
  return cols + 4 * ((cols + kernels::kQuantBlock - 1) / kernels::kQuantBlock);
}

// The shape of `t` with its last dim replaced.
std::vector<c10::SymInt> with_last(const at::Tensor& t, const c10::SymInt& last) {
  std::vector<c10::SymInt> shape(t.sym_sizes().begin(), t.sym_sizes().end());
  shape.back() = last;
  return shape;
}

void check_quantize(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "quantize_fp8: x must have a last dim of channels, got a 0-d tensor");
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()) && x.scalar_type() != at::kFloat8_e4m3fn &&
                        at::elementSize(x.scalar_type()) >= 2,
                    "quantize_fp8: x must be float64, float32, float16 or bfloat16, got ", x.scalar_type());
}

void check_dequantize(const at::Tensor& packed, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(packed.dim() >= 1 && packed.scalar_type() == at::kByte,
                    "dequantize_fp8: packed must be uint8 with a last dim of packed rows, got ", packed.scalar_type(),
                    " of shape ", packed.sym_sizes());
  TORCH_CHECK_VALUE(cols >= 0, "dequantize_fp8: cols=", cols, " must be >= 0");
  TORCH_CHECK_VALUE(packed.sym_size(-1) == kernels::packed_row_bytes(cols), "dequantize_fp8: packed rows hold ",
                    packed.sym_size(-1), " bytes but cols=", cols, " packs to ", kernels::packed_row_bytes(cols),
                    " (cols fp8 values + 4 bytes per block of ", kernels::kQuantBlock, ")");
  TORCH_CHECK_VALUE(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                    "dequantize_fp8: dtype must be float64, float32, float16 or bfloat16, got ", dtype);
}

template <void (*quantize)(const at::Tensor&, at::Tensor&)>
at::Tensor quantize_impl(const at::Tensor& x) {
  check_quantize(x);
  const int64_t cols = x.size(-1);
  at::Tensor packed = at::empty(C10_AS_INTARRAYREF_SLOW(with_last(x, kernels::packed_row_bytes(cols))),
                                x.options().dtype(at::kByte));
  if (x.numel() == 0) return packed;  // also cols = 0, which cannot be viewed as [-1, 0]
  at::Tensor rows = x.contiguous().view({-1, cols});
  at::Tensor out = packed.view({rows.size(0), packed.size(-1)});
  quantize(rows, out);
  return packed;
}

template <void (*dequantize)(const at::Tensor&, at::Tensor&)>
at::Tensor dequantize_impl(const at::Tensor& packed, int64_t cols, at::ScalarType dtype) {
  check_dequantize(packed, cols, dtype);
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(with_last(packed, cols)), packed.options().dtype(dtype));
  if (out.numel() == 0) return out;
  at::Tensor rows = packed.contiguous().view({-1, packed.size(-1)});
  at::Tensor dst = out.view({rows.size(0), cols});
  dequantize(rows, dst);
  return out;
}

at::Tensor quantize_meta(const at::Tensor& x) {
  check_quantize(x);
  return at::empty_symint(with_last(x, sym_packed_row_bytes(x.sym_size(-1))), x.options().dtype(at::kByte));
}

at::Tensor dequantize_meta(const at::Tensor& packed, int64_t cols, at::ScalarType dtype) {
  check_dequantize(packed, cols, dtype);
  return at::empty_symint(with_last(packed, cols), packed.options().dtype(dtype));
}

}  // namespace

}  // namespace alltoall::ops

TORCH_LIBRARY_FRAGMENT(alltoall, m) {
  m.def("quantize_fp8(Tensor x) -> Tensor");
  m.def("dequantize_fp8(Tensor packed, int cols, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(alltoall, CPU, m) {
  using namespace alltoall;
  m.impl("quantize_fp8", &ops::quantize_impl<kernels::quantize_fp8_cpu>);
  m.impl("dequantize_fp8", &ops::dequantize_impl<kernels::dequantize_fp8_cpu>);
}

TORCH_LIBRARY_IMPL(alltoall, Meta, m) {
  using namespace alltoall;
  m.impl("quantize_fp8", &ops::quantize_meta);
  m.impl("dequantize_fp8", &ops::dequantize_meta);
}

#ifdef ALLTOALL_WITH_CUDA
TORCH_LIBRARY_IMPL(alltoall, CUDA, m) {
  using namespace alltoall;
  m.impl("quantize_fp8", &ops::quantize_impl<kernels::quantize_fp8_cuda>);
  m.impl("dequantize_fp8", &ops::dequantize_impl<kernels::dequantize_fp8_cuda>);
}
#endif
