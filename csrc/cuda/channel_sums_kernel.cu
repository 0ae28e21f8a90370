// CUDA entry point of image_channel_sums. The kernels and their launch logic are in
// csrc/cuda/channel_sums_kernel.cuh (shared with the host emulation tests).

#include <torch/library.h>

#include "cuda/channel_sums_kernel.cuh"

namespace delt_ext {

TORCH_LIBRARY_IMPL(delt_ext, CUDA, m) {
  m.impl("image_channel_sums", &sums_cuda::image_channel_sums);
}

}  // namespace delt_ext
