// Shared pieces of image_channel_sums (schema and order in csrc/channel_sums.cpp): the argument
// check and the fold of the 32 partial sums, used by the CPU kernel and the CUDA kernels.
#pragma once

#include <ATen/ATen.h>

namespace delt_ext {

// Partial sums per plane: pixel i goes to partial i % kSumLanes (a CUDA warp's lanes).
constexpr int kSumLanes = 32;

inline void check_sums_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (N, C, H, W) tensor, got ", x.dim(),
              "-D with shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, ": x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

// Folds partials a[0], a[stride], ..., a[31 * stride] into a[0] as a warp's shuffle-down tree
// does: a[l] += a[l + k] for l < k, k = 16, 8, 4, 2, 1.
inline double fold_lanes(double* a, int64_t stride = 1) {
  for (int k = kSumLanes / 2; k > 0; k /= 2) {
    for (int l = 0; l < k; ++l) a[l * stride] += a[(l + k) * stride];
  }
  return a[0];
}

}  // namespace delt_ext
