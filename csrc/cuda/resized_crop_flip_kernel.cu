// CUDA entry points of the resized_crop_flip ops. The kernels and their launch logic are in
// csrc/cuda/resized_crop_flip_kernel.cuh (shared with the host emulation tests).

#include <torch/library.h>

#include "cuda/resized_crop_flip_kernel.cuh"

namespace delt_ext {

TORCH_LIBRARY_IMPL(delt_ext, CUDA, m) {
  m.impl("resized_crop_flip", &crop_cuda::resized_crop_flip);
  m.impl("resized_crop_flip_backward", &crop_cuda::resized_crop_flip_backward);
}

}  // namespace delt_ext
