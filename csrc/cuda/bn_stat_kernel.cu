// CUDA kernels of the BN-statistic ops (schemas in csrc/bn_stat.cpp; math and CPU twin in
// csrc/cpu/bn_stat_kernel.cpp).
//
// Forward = two launches, no atomics:
//   1. partial sums: a grid over channels x slices of each channel's N*H*W values (not one block
//      per channel), 16-byte vector loads, kLoads loads in flight per thread, shifted sums
//      S1 = sum(x - K_c), S2 = sum((x - K_c)^2) in float32 (float64 for float64), K_c = the
//      channel's first value;
//   2. finalize: one block merges each channel's partials in a fixed order in float64, writes
//      mean and biased variance and, for the loss, both norms, the loss and the per-channel
//      gradient coefficients. It reads C values of x (the shifts), never x itself again.
// Every reduction has a fixed shape and order, so results are bitwise reproducible run to run.
// Backward = one elementwise launch: dx = g * (a_c + 2 b_c (x - mean_c)) / M, one read of x
// and one write, g read from device memory (no host sync).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "bn_stat.h"

namespace delt_ext {
namespace {

constexpr int kThreads = 256;          // threads per block of the streaming kernels
constexpr int kLoads = 4;              // independent vector loads in flight per thread
constexpr int kMaxSlices = 256;        // partial sums per channel, at most
constexpr int64_t kTargetBlocks = 4096;  // fills every current GPU several times over
constexpr int kFinalizeThreads = 1024;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums a and b over a 1-D block (blockDim.x a multiple of 32) in a fixed tree; the result is
// valid in thread 0.
template <typename T>
__device__ void block_sum2(T& a, T& b) {
  __shared__ T shared_a[32], shared_b[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    shared_a[warp] = a;
    shared_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    a = lane < warps ? shared_a[lane] : T(0);
    b = lane < warps ? shared_b[lane] : T(0);
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

// NCHW: block (slice, channel) sums its slice of the channel's vectors. Vector v of a channel is
// plane n = v / vec_per_plane at offset (v % vec_per_plane) * VEC; a vector never straddles two
// planes (H*W % VEC == 0).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    nchw_partial_sums(const scalar_t* __restrict__ x, int64_t C, int64_t HW,
                      uint32_t vec_per_plane, uint32_t vec_per_channel, uint32_t vec_per_slice,
                      acc_t* __restrict__ partial) {
  const int64_t c = blockIdx.y;
  const uint32_t slice = blockIdx.x, slices = gridDim.x;
  const acc_t shift = static_cast<acc_t>(x[c * HW]);
  const uint32_t begin = slice * vec_per_slice;
  const uint32_t end = min(begin + vec_per_slice, vec_per_channel);
  acc_t s1 = 0, s2 = 0;
  for (uint32_t v0 = begin + threadIdx.x; v0 < end; v0 += kThreads * kLoads) {
    Pack<scalar_t, VEC> packs[kLoads];
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const uint32_t v = v0 + j * kThreads;
      if (v < end) {
        const uint32_t n = v / vec_per_plane, w = v - n * vec_per_plane;
        packs[j] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(
            x + (static_cast<int64_t>(n) * C + c) * HW + static_cast<int64_t>(w) * VEC);
      }
    }
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      if (v0 + j * kThreads < end) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t d = static_cast<acc_t>(packs[j].v[k]) - shift;
          s1 += d;
          s2 += d * d;
        }
      }
    }
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    acc_t* out = partial + (c * slices + slice) * 2;
    out[0] = s1;
    out[1] = s2;
  }
}

// channels_last: x is an (M, C) row-major matrix. Thread (tx, ty) of block (bx, slice) owns VEC
// consecutive channels starting at (bx * blockDim.x + tx) * VEC and the rows of the slice
// congruent to ty; the blockDim.y row partials are then added in ty order.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    channels_last_partial_sums(const scalar_t* __restrict__ x, int64_t M, int64_t C,
                               int64_t rows_per_slice, acc_t* __restrict__ partial) {
  extern __shared__ unsigned char shared_raw[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_raw);  // [blockDim.y][blockDim.x][VEC][2]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + tx) * VEC;
  const bool active = c0 < C;
  const int64_t slice = blockIdx.y, slices = gridDim.y;
  const int64_t r_begin = slice * rows_per_slice;
  const int64_t r_end = min(M, r_begin + rows_per_slice);
  acc_t shift[VEC], s1[VEC], s2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    shift[k] = active ? static_cast<acc_t>(x[c0 + k]) : acc_t(0);
    s1[k] = 0;
    s2[k] = 0;
  }
  if (active) {
    for (int64_t r0 = r_begin + ty; r0 < r_end; r0 += static_cast<int64_t>(blockDim.y) * kLoads) {
      Pack<scalar_t, VEC> packs[kLoads];
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        const int64_t r = r0 + static_cast<int64_t>(j) * blockDim.y;
        if (r < r_end) packs[j] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(x + r * C + c0);
      }
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        if (r0 + static_cast<int64_t>(j) * blockDim.y < r_end) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const acc_t d = static_cast<acc_t>(packs[j].v[k]) - shift[k];
            s1[k] += d;
            s2[k] += d * d;
          }
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    acc_t* slot = shared + ((static_cast<int64_t>(ty) * blockDim.x + tx) * VEC + k) * 2;
    slot[0] = s1[k];
    slot[1] = s2[k];
  }
  __syncthreads();
  if (ty == 0 && active) {
    for (int k = 0; k < VEC && c0 + k < C; ++k) {
      acc_t a = 0, b = 0;
      for (int t = 0; t < static_cast<int>(blockDim.y); ++t) {
        const acc_t* slot = shared + ((static_cast<int64_t>(t) * blockDim.x + tx) * VEC + k) * 2;
        a += slot[0];
        b += slot[1];
      }
      acc_t* out = partial + ((c0 + k) * slices + slice) * 2;
      out[0] = a;
      out[1] = b;
    }
  }
}

// One block. Groups of `group` lanes (a power of two <= 32) merge one channel's partials each,
// in slice order, then a fixed tree. With targets, also the loss and coef = [a; b] (the
// differences to the targets are staged in coef, then divided by their norms).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_moments(const scalar_t* __restrict__ x, int64_t shift_stride, int64_t C,
                     int64_t slices, int group, double count, const acc_t* __restrict__ partial,
                     const acc_t* __restrict__ target_mean, const acc_t* __restrict__ target_var,
                     acc_t* __restrict__ mean, acc_t* __restrict__ var, acc_t* __restrict__ coef,
                     acc_t* __restrict__ loss) {
  const int tid = threadIdx.x;
  const int lane = tid % group;
  const int64_t groups = blockDim.x / group;
  const bool with_loss = target_mean != nullptr;
  for (int64_t c_base = 0; c_base < C; c_base += groups) {
    const int64_t c = c_base + tid / group;
    double a = 0.0, b = 0.0;
    if (c < C) {
      for (int64_t s = lane; s < slices; s += group) {
        a += static_cast<double>(partial[(c * slices + s) * 2]);
        b += static_cast<double>(partial[(c * slices + s) * 2 + 1]);
      }
    }
    for (int offset = group / 2; offset > 0; offset >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, offset, group);
      b += __shfl_down_sync(0xffffffffu, b, offset, group);
    }
    if (lane == 0 && c < C) {
      const double d = a / count;
      const double mu = static_cast<double>(static_cast<acc_t>(x[c * shift_stride])) + d;
      const double v = fmax(b / count - d * d, 0.0);
      mean[c] = static_cast<acc_t>(mu);
      var[c] = static_cast<acc_t>(v);
      if (with_loss) {
        coef[c] = static_cast<acc_t>(mu - static_cast<double>(target_mean[c]));
        coef[C + c] = static_cast<acc_t>(v - static_cast<double>(target_var[c]));
      }
    }
  }
  if (!with_loss) return;  // uniform across the block
  __syncthreads();
  double ss_mean = 0.0, ss_var = 0.0;
  for (int64_t c = tid; c < C; c += blockDim.x) {
    const double dm = static_cast<double>(coef[c]), dv = static_cast<double>(coef[C + c]);
    ss_mean += dm * dm;
    ss_var += dv * dv;
  }
  block_sum2(ss_mean, ss_var);
  __shared__ double norms[2];
  if (tid == 0) {
    norms[0] = sqrt(ss_mean);
    norms[1] = sqrt(ss_var);
    *loss = static_cast<acc_t>(norms[0] + norms[1]);
  }
  __syncthreads();
  for (int64_t c = tid; c < C; c += blockDim.x) {
    coef[c] = norms[0] > 0.0 ? static_cast<acc_t>(static_cast<double>(coef[c]) / norms[0]) : acc_t(0);
    coef[C + c] =
        norms[1] > 0.0 ? static_cast<acc_t>(static_cast<double>(coef[C + c]) / norms[1]) : acc_t(0);
  }
}

// dx = c1 + c2 * (x - mean_c), c1 = g * grad_mean_c / M, c2 = 2 g * grad_var_c / M. Vector v
// covers elements [v * VEC, v * VEC + VEC), all in one channel (NCHW, H*W % VEC == 0) or in VEC
// consecutive channels (channels_last, C % VEC == 0).
template <typename scalar_t, typename acc_t, int VEC, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kThreads)
    batch_stat_backward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                               index_t vectors, index_t HW, index_t C,
                               const acc_t* __restrict__ mean, const acc_t* __restrict__ grad_mean,
                               const acc_t* __restrict__ grad_var,
                               const acc_t* __restrict__ grad_scale, acc_t inv_count) {
  const acc_t scale = grad_scale != nullptr ? *grad_scale : acc_t(1);
  const index_t base = static_cast<index_t>(blockIdx.x) * (kThreads * kLoads) + threadIdx.x;
  Pack<scalar_t, VEC> in[kLoads];
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const index_t v = base + j * kThreads;
    if (v < vectors) in[j] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(x + v * VEC);
  }
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const index_t v = base + j * kThreads;
    if (v >= vectors) continue;
    Pack<scalar_t, VEC> out;
    if constexpr (kChannelsLast) {
      const index_t c0 = (v * VEC) % C;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const index_t c = c0 + k;
        const acc_t c1 = scale * grad_mean[c] * inv_count;
        const acc_t c2 = 2 * scale * grad_var[c] * inv_count;
        out.v[k] = static_cast<scalar_t>(c1 + c2 * (static_cast<acc_t>(in[j].v[k]) - mean[c]));
      }
    } else {
      const index_t c = (v * VEC / HW) % C;
      const acc_t c1 = scale * grad_mean[c] * inv_count;
      const acc_t c2 = 2 * scale * grad_var[c] * inv_count;
      const acc_t mu = mean[c];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.v[k] = static_cast<scalar_t>(c1 + c2 * (static_cast<acc_t>(in[j].v[k]) - mu));
      }
    }
    *reinterpret_cast<Pack<scalar_t, VEC>*>(dx + v * VEC) = out;
  }
}

// Elements per 16-byte vector when every vector is aligned and stays inside one plane (NCHW) or
// one row (channels_last); 1 otherwise.
template <typename scalar_t>
int vector_width(const at::Tensor& x, Layout layout, const at::Tensor* other = nullptr) {
  constexpr int kWidth = 16 / sizeof(scalar_t);
  const int64_t run = layout == Layout::kNCHW ? x.size(2) * x.size(3) : x.size(1);
  const bool aligned = reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0 &&
                       (other == nullptr || reinterpret_cast<uintptr_t>(other->const_data_ptr()) % 16 == 0);
  return aligned && run % kWidth == 0 ? kWidth : 1;
}

// Fills mean and var (and, when target_mean is defined, coef and loss) for x.
template <typename scalar_t>
void launch_moments(const at::Tensor& x, Layout layout, const at::Tensor& target_mean,
                    const at::Tensor& target_var, at::Tensor& mean, at::Tensor& var,
                    at::Tensor& coef, at::Tensor& loss) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kWidth = 16 / sizeof(scalar_t);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), M = N * HW;
  TORCH_CHECK(M < std::numeric_limits<int32_t>::max(),
              "delt_ext: N*H*W must be below 2^31 per channel, got ", M);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  const int vec = vector_width<scalar_t>(x, layout);
  at::Tensor partial;
  int64_t slices = 0;

  if (layout == Layout::kNCHW) {
    TORCH_CHECK(C <= 65535, "delt_ext: at most 65535 channels are supported, got ", C);
    const int64_t vec_per_plane = HW / vec, vec_per_channel = M / vec;
    slices = std::clamp<int64_t>(std::min(ceil_div(vec_per_channel, kThreads * kLoads),
                                          ceil_div(kTargetBlocks, C)),
                                 1, kMaxSlices);
    const int64_t vec_per_slice = ceil_div(vec_per_channel, slices);
    slices = ceil_div(vec_per_channel, vec_per_slice);
    partial = at::empty({C, slices, 2}, mean.options());
    const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(C));
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      nchw_partial_sums<scalar_t, acc_t, V><<<grid, kThreads, 0, stream>>>(
          data, C, HW, static_cast<uint32_t>(vec_per_plane), static_cast<uint32_t>(vec_per_channel),
          static_cast<uint32_t>(vec_per_slice), partial.mutable_data_ptr<acc_t>());
    };
    if (vec == kWidth) {
      launch(std::integral_constant<int, kWidth>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  } else {
    const int64_t channel_vectors = C / vec;
    const int tx = std::min(next_pow2(channel_vectors), 32);
    const int ty = kThreads / tx;
    const int64_t blocks_x = ceil_div(channel_vectors, tx);
    TORCH_CHECK(blocks_x <= std::numeric_limits<int32_t>::max(), "delt_ext: too many channels");
    slices = std::clamp<int64_t>(std::min(ceil_div(M, static_cast<int64_t>(ty) * kLoads),
                                          ceil_div(kTargetBlocks, blocks_x)),
                                 1, kMaxSlices);
    const int64_t rows_per_slice = ceil_div(M, slices);
    slices = ceil_div(M, rows_per_slice);
    partial = at::empty({C, slices, 2}, mean.options());
    const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(slices));
    const dim3 block(tx, ty);
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const size_t shared = static_cast<size_t>(kThreads) * V * 2 * sizeof(acc_t);
      channels_last_partial_sums<scalar_t, acc_t, V><<<grid, block, shared, stream>>>(
          data, M, C, rows_per_slice, partial.mutable_data_ptr<acc_t>());
    };
    if (vec == kWidth) {
      launch(std::integral_constant<int, kWidth>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int group = std::min(next_pow2(slices), 32);
  const bool with_loss = target_mean.defined();
  finalize_moments<scalar_t, acc_t><<<1, kFinalizeThreads, 0, stream>>>(
      data, layout == Layout::kNCHW ? HW : 1, C, slices, group, static_cast<double>(M),
      partial.const_data_ptr<acc_t>(),
      with_loss ? target_mean.const_data_ptr<acc_t>() : nullptr,
      with_loss ? target_var.const_data_ptr<acc_t>() : nullptr, mean.mutable_data_ptr<acc_t>(),
      var.mutable_data_ptr<acc_t>(), with_loss ? coef.mutable_data_ptr<acc_t>() : nullptr,
      with_loss ? loss.mutable_data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> batch_mean_var_cuda(const at::Tensor& x) {
  check_stat_input(x, "delt_ext::batch_mean_var");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [xs, layout] = supported_layout(x);
  const auto options = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor mean = at::empty({x.size(1)}, options), var = at::empty({x.size(1)}, options);
  at::Tensor none;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_mean_var", [&] {
    launch_moments<scalar_t>(xs, layout, none, none, mean, var, none, none);
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stat_loss_cuda(
    const at::Tensor& x, const at::Tensor& running_mean, const at::Tensor& running_var) {
  const char* op = "delt_ext::bn_stat_loss";
  check_stat_input(x, op);
  check_stat_target(running_mean, x, "running_mean", op);
  check_stat_target(running_var, x, "running_var", op);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [xs, layout] = supported_layout(x);
  const int64_t C = x.size(1);
  const auto options = x.options().dtype(accumulate_type(x.scalar_type()));
  // No-ops for the usual float32 contiguous buffers.
  const at::Tensor target_mean = running_mean.to(options.dtype()).contiguous();
  const at::Tensor target_var = running_var.to(options.dtype()).contiguous();
  at::Tensor mean = at::empty({C}, options), var = at::empty({C}, options);
  at::Tensor coef = at::empty({2, C}, options), loss = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_loss", [&] {
    launch_moments<scalar_t>(xs, layout, target_mean, target_var, mean, var, coef, loss);
  });
  return {loss, mean, var, coef};
}

template <typename scalar_t, typename index_t>
void launch_backward(const at::Tensor& x, Layout layout, const at::Tensor& mean,
                     const at::Tensor& grad_mean, const at::Tensor& grad_var,
                     const at::Tensor& grad_scale, at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kWidth = 16 / sizeof(scalar_t);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int vec = vector_width<scalar_t>(x, layout, &dx);
  const int64_t vectors = x.numel() / vec;
  const int64_t blocks = ceil_div(vectors, kThreads * kLoads);
  const acc_t inv_count = static_cast<acc_t>(1.0 / static_cast<double>(N * HW));
  const acc_t* scale = grad_scale.defined() ? grad_scale.const_data_ptr<acc_t>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto width, auto channels_last) {
    constexpr int V = decltype(width)::value;
    constexpr bool kCL = decltype(channels_last)::value;
    batch_stat_backward_kernel<scalar_t, acc_t, V, kCL, index_t>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
            static_cast<index_t>(vectors), static_cast<index_t>(HW), static_cast<index_t>(C),
            mean.const_data_ptr<acc_t>(), grad_mean.const_data_ptr<acc_t>(),
            grad_var.const_data_ptr<acc_t>(), scale, inv_count);
  };
  using Wide = std::integral_constant<int, kWidth>;
  using Narrow = std::integral_constant<int, 1>;
  using CL = std::true_type;
  using NCHW = std::false_type;
  if (layout == Layout::kChannelsLast) {
    vec == kWidth ? launch(Wide{}, CL{}) : launch(Narrow{}, CL{});
  } else {
    vec == kWidth ? launch(Wide{}, NCHW{}) : launch(Narrow{}, NCHW{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor batch_stat_backward_cuda(const at::Tensor& x, const at::Tensor& mean,
                                    const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                    const c10::optional<at::Tensor>& grad_scale) {
  const char* op = "delt_ext::batch_stat_backward";
  check_stat_input(x, op);
  check_channel_vector(mean, x, "mean", op);
  check_channel_vector(grad_mean, x, "grad_mean", op);
  check_channel_vector(grad_var, x, "grad_var", op);
  check_grad_scale(grad_scale, x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [xs, layout] = supported_layout(x);
  const auto acc = accumulate_type(x.scalar_type());
  const at::Tensor m = mean.contiguous(), gm = grad_mean.contiguous(), gv = grad_var.contiguous();
  const at::Tensor scale =
      grad_scale.has_value() ? grad_scale->to(acc).reshape({}).contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(xs);
  if (dx.numel() == 0) return with_strides_of(dx, x);
  const bool small = xs.numel() < std::numeric_limits<uint32_t>::max() / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_stat_backward", [&] {
    if (small) {
      launch_backward<scalar_t, uint32_t>(xs, layout, m, gm, gv, scale, dx);
    } else {
      launch_backward<scalar_t, uint64_t>(xs, layout, m, gm, gv, scale, dx);
    }
  });
  return with_strides_of(dx, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(delt_ext, CUDA, m) {
  m.impl("batch_mean_var", &batch_mean_var_cuda);
  m.impl("bn_stat_loss", &bn_stat_loss_cuda);
  m.impl("batch_stat_backward", &batch_stat_backward_cuda);
}

}  // namespace delt_ext
