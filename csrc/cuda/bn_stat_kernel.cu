// CUDA entry points of the BN-statistic ops. The kernels and their launch logic are in
// csrc/cuda/bn_stat_kernel.cuh (shared with the host emulation tests).

#include <torch/library.h>

#include "cuda/bn_stat_kernel.cuh"

namespace delt_ext {

TORCH_LIBRARY_IMPL(delt_ext, CUDA, m) {
  m.impl("batch_mean_var", &bn_cuda::batch_mean_var);
  m.impl("bn_stat_loss", &bn_cuda::bn_stat_loss);
  m.impl("batch_stat_backward", &bn_cuda::batch_stat_backward);
  m.impl("bn_stat_loss_grouped", &bn_cuda::bn_stat_loss_grouped);
  m.impl("grouped_stat_backward", &bn_cuda::grouped_stat_backward);
}

}  // namespace delt_ext
