// What the kernel headers (csrc/cuda/*.cuh) need from CUDA beyond the language: launches, device
// guards, the current stream, dynamic shared memory, device-side checks and vector loads. nvcc
// gets the CUDA versions below; the host emulation of the tests (tests/cuda_emulation/, built
// with DELT_CUDA_EMULATION) defines the same names, so the very same kernel bodies and launch
// logic run there.
#pragma once

#ifdef DELT_CUDA_EMULATION
#include "cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

// kernel<<<grid, block, shared, stream>>>(args...), then the launch-error check. `kernel` must be
// one token (a function or a variable holding one), not a template-id with commas.
#define DELT_LAUNCH(kernel, grid, block, shared, stream, ...)     \
  do {                                                            \
    kernel<<<(grid), (block), (shared), (stream)>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                               \
  } while (0)
#define DELT_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#define DELT_DEVICE_GUARD(tensor) const c10::cuda::CUDAGuard delt_device_guard_((tensor).device())
// A failed check is a device-side assertion, reported by the next synchronizing CUDA call (as
// PyTorch's own kernels report bad indices); the message is printed by the device.
#define DELT_DEVICE_CHECK(cond, message) CUDA_KERNEL_ASSERT_MSG(cond, message)

namespace delt_ext::cuda {
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// One vector load / store of a P (a Pack); p must be aligned to alignof(P).
template <typename P>
__device__ __forceinline__ P load(const void* p) {
  return *reinterpret_cast<const P*>(p);
}
template <typename P>
__device__ __forceinline__ void store(void* p, const P& v) {
  *reinterpret_cast<P*>(p) = v;
}
}  // namespace delt_ext::cuda
#endif
