// CUDA kernels of image_channel_sums and their launch logic (schema and summation order in
// csrc/channel_sums.cpp; CPU twin in csrc/cpu/channel_sums_kernel.cpp). nvcc compiles this header
// into the extension (csrc/cuda/channel_sums_kernel.cu); the tests compile it with the host
// emulation of tests/cuda_emulation/ and run the same code on the CPU.
//
// One launch, no atomics, every value read once in its own dtype and widened to float64:
//   NCHW: one warp per (n, c) plane; lane l adds pixels l, l + 32, ... in order, then the warp's
//         shuffle-down tree (offsets 16, 8, 4, 2, 1) folds the 32 lanes; consecutive lanes read
//         consecutive values.
//   channels_last: a (32, 32) block per (image, tile of 32 channels); thread (tx, ty) adds the
//         pixels ty, ty + 32, ... of channel tile * 32 + tx (consecutive tx read consecutive
//         channels of a row), then the same tree over ty in shared memory.
// Both give the CPU kernel's bits for float32, float16 and bfloat16 x (float64: up to the
// rounding of the squares, which nvcc may fuse into the additions).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "bn_stat.h"
#include "channel_sums.h"
#include "cuda/compat.cuh"

namespace delt_ext {
namespace sums_cuda {

constexpr int kPlaneThreads = 256;  // 8 warps, one plane each
constexpr int64_t kMaxBlocks = 65535;

// The grid's cap (blocks in x for NCHW, in y for channels_last); the emulation tests lower it
// to run the grid-stride loops.
inline int64_t& max_blocks() {
  static int64_t n = kMaxBlocks;
  return n;
}

// A value as float64 (16-bit types through float, exactly).
template <typename scalar_t>
__device__ __forceinline__ double widen(scalar_t v) {
  return static_cast<double>(static_cast<at::opmath_type<scalar_t>>(v));
}

// NCHW: warp w of the grid sums planes w, w + warps, ...
template <typename scalar_t>
__global__ void __launch_bounds__(kPlaneThreads)
    plane_sums(const scalar_t* __restrict__ x, int64_t planes, int64_t HW, double* __restrict__ sum,
               double* __restrict__ sq) {
  constexpr int kWarps = kPlaneThreads / kSumLanes;
  const int lane = threadIdx.x % kSumLanes;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t plane = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kSumLanes;
       plane < planes; plane += warps) {  // uniform across the warp
    const scalar_t* p = x + plane * HW;
    double s = 0.0, q = 0.0;
    for (int64_t i = lane; i < HW; i += kSumLanes) {
      const double d = widen(p[i]);
      s += d;
      q += d * d;
    }
#pragma unroll
    for (int k = kSumLanes / 2; k > 0; k /= 2) {
      s += __shfl_down_sync(0xffffffffu, s, k);
      q += __shfl_down_sync(0xffffffffu, q, k);
    }
    if (lane == 0) {
      sum[plane] = s;
      sq[plane] = q;
    }
  }
}

// channels_last: block (tile, y) sums images y, y + gridDim.y, ... over channels
// [tile * 32, tile * 32 + 32).
template <typename scalar_t>
__global__ void __launch_bounds__(kSumLanes* kSumLanes)
    row_sums(const scalar_t* __restrict__ x, int64_t N, int64_t HW, int64_t C,
             double* __restrict__ sum, double* __restrict__ sq) {
  __shared__ double shared_s[kSumLanes][kSumLanes + 1], shared_q[kSumLanes][kSumLanes + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSumLanes + tx;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {  // uniform across the block
    double s = 0.0, q = 0.0;
    if (c < C) {
      for (int64_t r = ty; r < HW; r += kSumLanes) {
        const double d = widen(x[(n * HW + r) * C + c]);
        s += d;
        q += d * d;
      }
    }
    shared_s[ty][tx] = s;
    shared_q[ty][tx] = q;
    __syncthreads();
    for (int k = kSumLanes / 2; k > 0; k /= 2) {
      if (ty < k) {
        shared_s[ty][tx] += shared_s[ty + k][tx];
        shared_q[ty][tx] += shared_q[ty + k][tx];
      }
      __syncthreads();
    }
    if (ty == 0 && c < C) {
      sum[n * C + c] = shared_s[0][tx];
      sq[n * C + c] = shared_q[0][tx];
    }
    __syncthreads();  // the next image's partials overwrite shared memory
  }
}

inline std::tuple<at::Tensor, at::Tensor> image_channel_sums(const at::Tensor& x) {
  check_sums_input(x, "delt_ext::image_channel_sums");
  DELT_DEVICE_GUARD(x);
  const auto options = x.options().dtype(at::kDouble);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor sum = at::empty({N, C}, options), sq = at::empty({N, C}, options);
  if (N * C == 0) return {sum, sq};
  if (HW == 0) return {sum.zero_(), sq.zero_()};
  const auto [xs, layout] = supported_layout(x);
  const cudaStream_t stream = cuda::current_stream();
  double* s = sum.mutable_data_ptr<double>();
  double* q = sq.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "image_channel_sums", [&] {
        const scalar_t* data = xs.const_data_ptr<scalar_t>();
        if (layout == Layout::kNCHW) {
          constexpr int64_t kWarps = kPlaneThreads / kSumLanes;
          const int64_t blocks = std::min<int64_t>((N * C + kWarps - 1) / kWarps, max_blocks());
          auto kernel = plane_sums<scalar_t>;
          DELT_LAUNCH(kernel, static_cast<unsigned>(blocks), kPlaneThreads, 0, stream, data, N * C,
                      HW, s, q);
        } else {
          const int64_t tiles = (C + kSumLanes - 1) / kSumLanes;
          TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(),
                      "delt_ext::image_channel_sums: too many channels: ", C);
          const dim3 grid(static_cast<unsigned>(tiles),
                          static_cast<unsigned>(std::min<int64_t>(N, max_blocks())));
          const dim3 block(kSumLanes, kSumLanes);
          auto kernel = row_sums<scalar_t>;
          DELT_LAUNCH(kernel, grid, block, 0, stream, data, N, HW, C, s, q);
        }
      });
  return {sum, sq};
}

}  // namespace sums_cuda
}  // namespace delt_ext
