// Schema of image_channel_sums, the float64 per-image channel sums behind `delt stats`. Kernels:
// csrc/cpu/channel_sums_kernel.cpp, csrc/cuda/channel_sums_kernel.cu; fake kernel:
// delt_ext/ops.py.

#include <torch/library.h>

#include "build_info.h"

namespace delt_ext {

TORCH_LIBRARY_FRAGMENT(delt_ext, m) {
  // For a 4-D x (N, C, H, W): sum[n, c] = sum over (h, w) of x[n, c, h, w] and sq[n, c] = the
  // sum of its squares, both float64 (N, C), each value widened to float64 before it is added
  // (one read of x in its own dtype, no float64 copy). Pixel i of a plane (row-major over H, W)
  // is added to partial sum i % 32 in pixel order, and the 32 partials are folded as a tree
  // (partial l += partial l + k for k = 16, 8, 4, 2, 1): the same order on every backend,
  // layout and thread count. Not differentiable.
  m.def("image_channel_sums(Tensor x) -> (Tensor sum, Tensor sq)");
}

#ifndef WITH_CUDA
TORCH_LIBRARY_IMPL(delt_ext, CUDA, m) { register_missing_cuda(m, {"image_channel_sums"}); }
#endif

}  // namespace delt_ext
