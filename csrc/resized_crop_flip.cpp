// Schemas of the fused random-resized-crop + flip + roll ops. Semantics and conventions:
// csrc/resized_crop_flip.h; kernels: csrc/cpu/resized_crop_flip_kernel.cpp,
// csrc/cuda/resized_crop_flip_kernel.cu; fake kernels and autograd: delt_ext/ops.py.

#include <torch/library.h>

#include "build_info.h"

namespace delt_ext {

TORCH_LIBRARY_FRAGMENT(delt_ext, m) {
  // x (N, C, H, W) -> (N, C, out_h, out_w), laid out like x (NCHW or channels_last); params
  // (N, 7) or (1, 7) float32/float64 rows [top, left, height, width, flip, shift_y, shift_x].
  m.def("resized_crop_flip(Tensor x, Tensor params, SymInt out_h, SymInt out_w) -> Tensor");
  // The adjoint: grad_out (N, C, out_h, out_w) -> grad_x (N, C, in_h, in_w), laid out like
  // grad_out, zero outside each crop box. A gather: deterministic, no atomics.
  m.def(
      "resized_crop_flip_backward(Tensor grad_out, Tensor params, SymInt in_h, SymInt in_w) "
      "-> Tensor");
}

#ifndef WITH_CUDA
TORCH_LIBRARY_IMPL(delt_ext, CUDA, m) {
  register_missing_cuda(m, {"resized_crop_flip", "resized_crop_flip_backward"});
}
#endif

}  // namespace delt_ext
