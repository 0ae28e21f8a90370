// CUDA kernels of the BN-statistic ops and their launch logic (schemas in csrc/bn_stat.cpp; math
// and CPU twin in csrc/cpu/bn_stat_kernel.cpp). nvcc compiles this header into the extension
// (csrc/cuda/bn_stat_kernel.cu registers the entry points); the tests compile it with the host
// emulation of tests/cuda_emulation/ and run the same code on the CPU.
//
// Forward = two launches, no atomics:
//   1. partial sums: a grid over channels x slices of each channel's N*H*W values (not one block
//      per channel), kLoads vector loads in flight per thread, shifted sums S1 = sum(x - K_c),
//      S2 = sum((x - K_c)^2) in float32 (float64 for float64), K_c = the channel's first value (0
//      if not finite);
//   2. finalize: one block merges each channel's partials in a fixed order in float64, writes
//      mean and biased variance and, for the loss, both norms, the loss and the per-channel
//      gradient coefficients. It reads C values of x (the shifts), and x itself again only for
//      a channel whose sums are not finite (NaN/inf in x, or overflow): that channel gets an
//      exact two-pass float64 mean and variance, as the CPU kernel does (NaN/Inf semantics of
//      the eager formula; see csrc/cpu/bn_stat_kernel.cpp). A non-finite first value shifts by 0.
// Work is split in groups of kWidth = 16 / sizeof(scalar_t) consecutive values of a channel
// (NCHW: of its N*H*W sequence; channels_last: kWidth adjacent channels of a row). A group is
// loaded with the widest vectors its alignment allows (16, 8, 4 bytes or scalars), but always
// summed value by value in the same order, so a misaligned view gives the very same bits as an
// aligned copy of its values. Every reduction has a fixed shape and order: results are bitwise
// reproducible run to run.
// Backward = two launches: the per-channel coefficients c1 = g * grad_mean / M and
// c2 = 2 g * grad_var / M (a (3, C) table with the means), then one elementwise pass
// dx = c1 + c2 (x - mean_c): one read of x and one write, g read from device memory (no host
// sync), the table read as aligned vectors.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

#include "bn_stat.h"
#include "cuda/compat.cuh"

namespace delt_ext {
namespace bn_cuda {

constexpr int kThreads = 256;                  // threads per block of the streaming kernels
constexpr int kLoads = 4;                      // independent vector loads in flight per thread
constexpr int64_t kTargetBlocks = 4096;        // fills every current GPU several times over
constexpr int64_t kMaxSlices = kTargetBlocks;  // partial sums per channel, at most
constexpr int kFinalizeThreads = 1024;
constexpr int64_t kTableAlign = 8;  // coefficient table rows padded to 8 values (32+ bytes)

// What the last launches chose, for the emulation tests (recorded only in emulation builds).
struct LaunchRecord {
  bool channels_last = false;
  int load_width = 0, backward_width = 0;
  int64_t grid_x = 0, grid_y = 0, slices = 0;
};
inline LaunchRecord& last_launch() {
  static thread_local LaunchRecord record;
  return record;
}
#ifdef DELT_CUDA_EMULATION
#define DELT_RECORD(field, value) (::delt_ext::bn_cuda::last_launch().field = (value))
#else
#define DELT_RECORD(field, value) ((void)0)
#endif

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Values per group: one 16-byte vector.
template <typename scalar_t>
constexpr int group_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

__host__ __device__ inline bool is_finite(double v) { return v - v == 0.0; }  // not NaN/inf

// The shift of a channel: its first value, or 0 when that is not finite.
template <typename acc_t>
__host__ __device__ inline acc_t shift_of(acc_t first) {
  return is_finite(static_cast<double>(first)) ? first : acc_t(0);
}

// Statistic s (float64) as the loss sees it: s, unless rounding it to acc_t overflows; then the
// overflowed value, as the eager formula computes with it (csrc/cpu/bn_stat_kernel.cpp).
template <typename acc_t>
__host__ __device__ inline double as_returned(double s) {
  const acc_t rounded = static_cast<acc_t>(s);
  return is_finite(static_cast<double>(rounded)) ? s : static_cast<double>(rounded);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums a and b over a block (blockDim.x * blockDim.y a multiple of 32, at most 1024) in a fixed
// tree; the result is valid in thread 0.
template <typename T>
__device__ void block_sum2(T& a, T& b) {
  __shared__ T shared_a[32], shared_b[32];
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int lane = tid % 32, warp = tid / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    shared_a[warp] = a;
    shared_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = static_cast<int>(blockDim.x * blockDim.y) / 32;
    a = lane < warps ? shared_a[lane] : T(0);
    b = lane < warps ? shared_b[lane] : T(0);
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

// Loads the values [first, first + W) into pack.v, W / LOAD vectors of LOAD values; vector l is
// loaded when `valid(l * LOAD)` (the rest stay 0). address(l * LOAD) is its first value.
template <typename scalar_t, int W, int LOAD, typename Address, typename Valid>
__device__ __forceinline__ Pack<scalar_t, W> load_group(Address address, Valid valid) {
  Pack<scalar_t, W> pack;
#pragma unroll
  for (int l = 0; l < W / LOAD; ++l) {
    Pack<scalar_t, LOAD> part;
    if (valid(l * LOAD)) {
      part = cuda::load<Pack<scalar_t, LOAD>>(address(l * LOAD));
    } else {
#pragma unroll
      for (int k = 0; k < LOAD; ++k) part.v[k] = scalar_t(0);
    }
#pragma unroll
    for (int k = 0; k < LOAD; ++k) pack.v[l * LOAD + k] = part.v[k];
  }
  return pack;
}

// NCHW: block (channel, slice) sums its slice of the channel's groups. Value e of a channel
// (0 <= e < M) is at plane n = e / HW, offset e % HW; a LOAD-vector never straddles two planes
// (LOAD divides HW).
template <typename scalar_t, typename acc_t, int LOAD>
__global__ void __launch_bounds__(kThreads)
    nchw_partial_sums(const scalar_t* __restrict__ x, int64_t C, int64_t HW, uint32_t M,
                      uint32_t groups_per_slice, acc_t* __restrict__ partial) {
  constexpr int W = group_width<scalar_t>();
  const int64_t c = blockIdx.x;
  const uint32_t slice = blockIdx.y, slices = gridDim.y;
  const uint32_t groups = static_cast<uint32_t>(ceil_div(M, W));
  const acc_t shift = shift_of(static_cast<acc_t>(x[c * HW]));
  const uint32_t begin = slice * groups_per_slice;
  const uint32_t end = std::min<uint32_t>(begin + groups_per_slice, groups);
  const uint32_t hw = static_cast<uint32_t>(HW);
  acc_t s1 = 0, s2 = 0;
  for (uint32_t g0 = begin + threadIdx.x; g0 < end; g0 += kThreads * kLoads) {
    Pack<scalar_t, W> packs[kLoads];
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const uint32_t g = g0 + j * kThreads;
      if (g < end) {
        const uint32_t e0 = g * W;
        packs[j] = load_group<scalar_t, W, LOAD>(
            [&](int k) {
              const uint32_t e = e0 + k, n = e / hw;
              return x + (static_cast<int64_t>(n) * C + c) * HW + (e - n * hw);
            },
            [&](int k) { return e0 + k < M; });
      }
    }
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const uint32_t g = g0 + j * kThreads;
      if (g < end) {
#pragma unroll
        for (int k = 0; k < W; ++k) {
          if (g * W + k < M) {
            const acc_t d = static_cast<acc_t>(packs[j].v[k]) - shift;
            s1 += d;
            s2 += d * d;
          }
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

// channels_last: x is an (M, C) row-major matrix. Thread (tx, ty) of block (bx, slice) owns the
// group of W channels starting at c0 = (bx * blockDim.x + tx) * W and the rows of the slice
// congruent to ty; the blockDim.y row partials are then added in ty order.
template <typename scalar_t, typename acc_t, int LOAD>
__global__ void __launch_bounds__(kThreads)
    channels_last_partial_sums(const scalar_t* __restrict__ x, int64_t M, int64_t C,
                               int64_t rows_per_slice, acc_t* __restrict__ partial) {
  constexpr int W = group_width<scalar_t>();
  DELT_DYNAMIC_SHARED(unsigned char, shared_raw);
  acc_t* shared = reinterpret_cast<acc_t*>(shared_raw);  // [blockDim.y][blockDim.x][W][2]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + tx) * W;
  const bool active = c0 < C;
  const int64_t slice = blockIdx.y, slices = gridDim.y;
  const int64_t r_begin = slice * rows_per_slice;
  const int64_t r_end = std::min<int64_t>(M, r_begin + rows_per_slice);
  acc_t shift[W], s1[W], s2[W];
#pragma unroll
  for (int k = 0; k < W; ++k) {
    shift[k] = active && c0 + k < C ? shift_of(static_cast<acc_t>(x[c0 + k])) : acc_t(0);
    s1[k] = 0;
    s2[k] = 0;
  }
  if (active) {
    for (int64_t r0 = r_begin + ty; r0 < r_end; r0 += static_cast<int64_t>(blockDim.y) * kLoads) {
      Pack<scalar_t, W> packs[kLoads];
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        const int64_t r = r0 + static_cast<int64_t>(j) * blockDim.y;
        if (r < r_end) {
          const scalar_t* row = x + r * C + c0;
          packs[j] = load_group<scalar_t, W, LOAD>([&](int k) { return row + k; },
                                                   [&](int k) { return c0 + k < C; });
        }
      }
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        if (r0 + static_cast<int64_t>(j) * blockDim.y < r_end) {
#pragma unroll
          for (int k = 0; k < W; ++k) {
            const acc_t d = static_cast<acc_t>(packs[j].v[k]) - shift[k];
            s1[k] += d;
            s2[k] += d * d;
          }
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < W; ++k) {
    acc_t* slot = shared + ((static_cast<int64_t>(ty) * blockDim.x + tx) * W + k) * 2;
    slot[0] = s1[k];
    slot[1] = s2[k];
  }
  __syncthreads();
  if (ty == 0 && active) {
    for (int k = 0; k < W && c0 + k < C; ++k) {
      acc_t a = 0, b = 0;
      for (int t = 0; t < static_cast<int>(blockDim.y); ++t) {
        const acc_t* slot = shared + ((static_cast<int64_t>(t) * blockDim.x + tx) * W + k) * 2;
        a += slot[0];
        b += slot[1];
      }
      acc_t* out = partial + ((c0 + k) * slices + slice) * 2;
      out[0] = a;
      out[1] = b;
    }
  }
}

// Exact float64 two-pass mean and biased variance of channel c by the whole block (fixed order:
// thread t takes values t, t + blockDim.x, ...; then block_sum2). Valid in every thread.
template <typename scalar_t>
__device__ void exact_channel_moments(const scalar_t* __restrict__ x, int64_t C, int64_t HW,
                                      bool channels_last, int64_t c, double count, double& mean,
                                      double& var) {
  __shared__ double result[2];
  const int64_t M = static_cast<int64_t>(count);
  auto at = [&](int64_t e) {
    const int64_t n = e / HW, i = e - n * HW;
    return static_cast<double>(channels_last ? x[e * C + c] : x[(n * C + c) * HW + i]);
  };
  double sum = 0.0, unused = 0.0;
  for (int64_t e = threadIdx.x; e < M; e += blockDim.x) sum += at(e);
  block_sum2(sum, unused);
  if (threadIdx.x == 0) result[0] = sum / count;
  __syncthreads();
  mean = result[0];
  double squares = 0.0;
  unused = 0.0;
  for (int64_t e = threadIdx.x; e < M; e += blockDim.x) {
    const double d = at(e) - mean;
    squares += d * d;
  }
  block_sum2(squares, unused);
  if (threadIdx.x == 0) result[1] = squares / count;
  __syncthreads();
  var = result[1];
  __syncthreads();  // result and block_sum2's shared memory are reused by the next call
}

// One block. Groups of `group` lanes (a power of two <= 32) merge one channel's partials each,
// in slice order, then a fixed tree. Channels whose merged sums are not finite (NaN/inf in x, or
// overflow) are then recomputed exactly by the whole block. With targets, also the loss and
// coef = [a; b] (the differences to the targets are staged in coef, then divided by their norms).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_moments(const scalar_t* __restrict__ x, bool channels_last, int64_t HW, int64_t C,
                     int64_t slices, int group, double count, const acc_t* __restrict__ partial,
                     const acc_t* __restrict__ target_mean, const acc_t* __restrict__ target_var,
                     acc_t* __restrict__ mean, acc_t* __restrict__ var, acc_t* __restrict__ coef,
                     acc_t* __restrict__ loss) {
  __shared__ int any_inexact;
  const int tid = threadIdx.x;
  const int lane = tid % group;
  const int64_t groups = blockDim.x / group;
  const bool with_loss = target_mean != nullptr;
  const int64_t shift_stride = channels_last ? 1 : HW;
  if (tid == 0) any_inexact = 0;
  __syncthreads();
  auto stage = [&](int64_t c, double mu, double v) {
    mean[c] = static_cast<acc_t>(mu);
    var[c] = static_cast<acc_t>(v);
    if (with_loss) {
      coef[c] = static_cast<acc_t>(as_returned<acc_t>(mu) - static_cast<double>(target_mean[c]));
      coef[C + c] = static_cast<acc_t>(as_returned<acc_t>(v) - static_cast<double>(target_var[c]));
    }
  };
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
      if (!is_finite(a) || !is_finite(b)) {
        var[c] = acc_t(-1);  // marks the channel for the exact pass below (var >= 0 otherwise)
        any_inexact = 1;
      } else {
        const double d = a / count;
        const double mu =
            static_cast<double>(shift_of(static_cast<acc_t>(x[c * shift_stride]))) + d;
        stage(c, mu, fmax(b / count - d * d, 0.0));
      }
    }
  }
  __syncthreads();
  if (any_inexact != 0) {  // uniform across the block
    for (int64_t c = 0; c < C; ++c) {
      if (!(var[c] == acc_t(-1))) continue;  // uniform: every thread reads the same value
      double mu = 0.0, v = 0.0;
      __syncthreads();  // every thread has read the mark before thread 0 overwrites it
      exact_channel_moments(x, C, HW, channels_last, c, count, mu, v);
      if (tid == 0) stage(c, mu, v);
      __syncthreads();
    }
  }
  if (!with_loss) return;  // uniform across the block
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
  // 0 only at a zero norm (autograd's subgradient); a NaN norm makes every coefficient NaN.
  for (int64_t c = tid; c < C; c += blockDim.x) {
    coef[c] =
        norms[0] == 0.0 ? acc_t(0) : static_cast<acc_t>(static_cast<double>(coef[c]) / norms[0]);
    coef[C + c] = norms[1] == 0.0 ? acc_t(0)
                                  : static_cast<acc_t>(static_cast<double>(coef[C + c]) / norms[1]);
  }
}

// table = [c1; c2; mean], rows of `row` (>= C, a multiple of kTableAlign) values:
// c1 = g * grad_mean / M, c2 = 2 g * grad_var / M.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_coefficients(int64_t C, int64_t row, const acc_t* __restrict__ mean,
                          const acc_t* __restrict__ grad_mean, const acc_t* __restrict__ grad_var,
                          const acc_t* __restrict__ grad_scale, acc_t inv_count,
                          acc_t* __restrict__ table) {
  const acc_t scale = grad_scale != nullptr ? *grad_scale : acc_t(1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += stride) {
    table[c] = scale * grad_mean[c] * inv_count;
    table[row + c] = 2 * scale * grad_var[c] * inv_count;
    table[2 * row + c] = mean[c];
  }
}

// dx = c1 + c2 * (x - mean_c). Vector v covers elements [v * VEC, v * VEC + VEC), all in one
// channel (NCHW, VEC divides H*W) or in VEC consecutive channels (channels_last, VEC divides C).
template <typename scalar_t, typename acc_t, int VEC, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kThreads)
    batch_stat_backward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                               index_t vectors, index_t HW, index_t C, index_t row,
                               const acc_t* __restrict__ table) {
  const index_t base = static_cast<index_t>(blockIdx.x) * (kThreads * kLoads) + threadIdx.x;
  Pack<scalar_t, VEC> in[kLoads];
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const index_t v = base + j * kThreads;
    if (v < vectors) in[j] = cuda::load<Pack<scalar_t, VEC>>(x + v * VEC);
  }
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const index_t v = base + j * kThreads;
    if (v >= vectors) continue;
    Pack<scalar_t, VEC> out;
    if constexpr (kChannelsLast) {
      const index_t c0 = (v * VEC) % C;
      const auto c1 = cuda::load<Pack<acc_t, VEC>>(table + c0);
      const auto c2 = cuda::load<Pack<acc_t, VEC>>(table + row + c0);
      const auto mu = cuda::load<Pack<acc_t, VEC>>(table + 2 * row + c0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.v[k] =
            static_cast<scalar_t>(c1.v[k] + c2.v[k] * (static_cast<acc_t>(in[j].v[k]) - mu.v[k]));
      }
    } else {
      const index_t c = (v * VEC / HW) % C;
      const acc_t c1 = table[c], c2 = table[row + c], mu = table[2 * row + c];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.v[k] = static_cast<scalar_t>(c1 + c2 * (static_cast<acc_t>(in[j].v[k]) - mu));
      }
    }
    cuda::store(dx + v * VEC, out);
  }
}

// The layout the CUDA kernels read x in: as supported_layout, except that H = W = 1 is read as
// the (N, C) matrix it is (channels_last kernels: contiguous channel vectors, no grid limit on C).
inline Layout cuda_layout(const at::Tensor& xs, Layout layout) {
  return xs.size(2) * xs.size(3) == 1 ? Layout::kChannelsLast : layout;
}

// Widest vector (in values, 16 bytes at most) that divides `run` and every pointer's alignment.
template <typename scalar_t>
int vector_width(int64_t run, std::initializer_list<const void*> pointers) {
  int width = group_width<scalar_t>();
  for (; width > 1; width /= 2) {
    const uintptr_t bytes = static_cast<uintptr_t>(width) * sizeof(scalar_t);
    bool aligned = run % width == 0;
    for (const void* p : pointers) aligned = aligned && reinterpret_cast<uintptr_t>(p) % bytes == 0;
    if (aligned) break;
  }
  return width;
}

// Calls f(std::integral_constant<int, w>) for the runtime width w (a power of two <= 16 bytes).
template <typename scalar_t, typename F>
void with_width(int width, F&& f) {
  constexpr int W = group_width<scalar_t>();
  if (width == W) return f(std::integral_constant<int, W>{});
  if constexpr (W >= 2) {
    if (width == W / 2) return f(std::integral_constant<int, W / 2>{});
  }
  if constexpr (W >= 4) {
    if (width == W / 4) return f(std::integral_constant<int, W / 4>{});
  }
  if constexpr (W >= 8) {
    if (width == W / 8) return f(std::integral_constant<int, W / 8>{});
  }
  TORCH_CHECK(width == 1, "delt_ext: internal error: vector width ", width);
  if constexpr (W > 1) f(std::integral_constant<int, 1>{});
}

// Fills mean and var (and, when target_mean is defined, coef and loss) for x.
template <typename scalar_t>
void launch_moments(const at::Tensor& x, Layout layout, const at::Tensor& target_mean,
                    const at::Tensor& target_var, at::Tensor& mean, at::Tensor& var,
                    at::Tensor& coef, at::Tensor& loss) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = group_width<scalar_t>();
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), M = N * HW;
  TORCH_CHECK(M < std::numeric_limits<int32_t>::max() - W,
              "delt_ext: N*H*W must be below 2^31 per channel, got ", M);
  const cudaStream_t stream = cuda::current_stream();
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  at::Tensor partial;
  int64_t slices = 0;

  if (layout == Layout::kNCHW) {
    const int vec = vector_width<scalar_t>(HW, {data});
    const int64_t groups = ceil_div(M, W);
    slices = std::clamp<int64_t>(
        std::min(ceil_div(groups, kThreads * kLoads), ceil_div(kTargetBlocks, C)), 1, kMaxSlices);
    const int64_t groups_per_slice = ceil_div(groups, slices);
    slices = ceil_div(groups, groups_per_slice);
    TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), "delt_ext: too many channels: ", C);
    partial = at::empty({C, slices, 2}, mean.options());
    const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(slices));
    DELT_RECORD(channels_last, false);
    DELT_RECORD(load_width, vec);
    DELT_RECORD(grid_x, C);
    DELT_RECORD(grid_y, slices);
    acc_t* out = partial.mutable_data_ptr<acc_t>();
    with_width<scalar_t>(vec, [&](auto width) {
      auto kernel = nchw_partial_sums<scalar_t, acc_t, decltype(width)::value>;
      DELT_LAUNCH(kernel, grid, kThreads, 0, stream, data, C, HW, static_cast<uint32_t>(M),
                  static_cast<uint32_t>(groups_per_slice), out);
    });
  } else {
    const int vec = vector_width<scalar_t>(C, {data});
    const int64_t channel_groups = ceil_div(C, W);
    const int tx = std::min(next_pow2(channel_groups), 32);
    const int ty = kThreads / tx;
    const int64_t blocks_x = ceil_div(channel_groups, tx);
    TORCH_CHECK(blocks_x <= std::numeric_limits<int32_t>::max(), "delt_ext: too many channels");
    slices = std::clamp<int64_t>(
        std::min(ceil_div(M, static_cast<int64_t>(ty) * kLoads), ceil_div(kTargetBlocks, blocks_x)),
        1, kMaxSlices);
    const int64_t rows_per_slice = ceil_div(M, slices);
    slices = ceil_div(M, rows_per_slice);
    partial = at::empty({C, slices, 2}, mean.options());
    const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(slices));
    const dim3 block(tx, ty);
    const size_t shared = static_cast<size_t>(kThreads) * W * 2 * sizeof(acc_t);
    DELT_RECORD(channels_last, true);
    DELT_RECORD(load_width, vec);
    DELT_RECORD(grid_x, blocks_x);
    DELT_RECORD(grid_y, slices);
    acc_t* out = partial.mutable_data_ptr<acc_t>();
    with_width<scalar_t>(vec, [&](auto width) {
      auto kernel = channels_last_partial_sums<scalar_t, acc_t, decltype(width)::value>;
      DELT_LAUNCH(kernel, grid, block, shared, stream, data, M, C, rows_per_slice, out);
    });
  }

  const int group = std::min(next_pow2(slices), 32);
  const bool with_loss = target_mean.defined();
  auto finalize = finalize_moments<scalar_t, acc_t>;
  DELT_LAUNCH(finalize, 1, kFinalizeThreads, 0, stream, data, layout == Layout::kChannelsLast, HW,
              C, slices, group, static_cast<double>(M), partial.const_data_ptr<acc_t>(),
              with_loss ? target_mean.const_data_ptr<acc_t>() : nullptr,
              with_loss ? target_var.const_data_ptr<acc_t>() : nullptr,
              mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(),
              with_loss ? coef.mutable_data_ptr<acc_t>() : nullptr,
              with_loss ? loss.mutable_data_ptr<acc_t>() : nullptr);
}

inline std::tuple<at::Tensor, at::Tensor> batch_mean_var(const at::Tensor& x) {
  check_stat_input(x, "delt_ext::batch_mean_var");
  DELT_DEVICE_GUARD(x);
  const auto [xs, supported] = supported_layout(x);
  const Layout layout = cuda_layout(xs, supported);
  const auto options = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor mean = at::empty({x.size(1)}, options), var = at::empty({x.size(1)}, options);
  at::Tensor none;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_mean_var", [&] {
    launch_moments<scalar_t>(xs, layout, none, none, mean, var, none, none);
  });
  return {mean, var};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stat_loss(
    const at::Tensor& x, const at::Tensor& running_mean, const at::Tensor& running_var) {
  const char* op = "delt_ext::bn_stat_loss";
  check_stat_input(x, op);
  check_stat_target(running_mean, x, "running_mean", op);
  check_stat_target(running_var, x, "running_var", op);
  DELT_DEVICE_GUARD(x);
  const auto [xs, supported] = supported_layout(x);
  const Layout layout = cuda_layout(xs, supported);
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
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const cudaStream_t stream = cuda::current_stream();
  const int64_t row = ceil_div(C, kTableAlign) * kTableAlign;
  at::Tensor table = at::empty({3, row}, mean.options());
  const acc_t inv_count = static_cast<acc_t>(1.0 / static_cast<double>(N * HW));
  const acc_t* scale = grad_scale.defined() ? grad_scale.const_data_ptr<acc_t>() : nullptr;
  auto coefficients = backward_coefficients<acc_t>;
  DELT_LAUNCH(coefficients, static_cast<unsigned>(std::min<int64_t>(ceil_div(C, kThreads), 1024)),
              kThreads, 0, stream, C, row, mean.const_data_ptr<acc_t>(),
              grad_mean.const_data_ptr<acc_t>(), grad_var.const_data_ptr<acc_t>(), scale, inv_count,
              table.mutable_data_ptr<acc_t>());

  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  const bool channels_last = layout == Layout::kChannelsLast;
  const int vec = vector_width<scalar_t>(channels_last ? C : HW, {in, out});
  DELT_RECORD(backward_width, vec);
  with_width<scalar_t>(vec, [&](auto width) {
    constexpr int V = decltype(width)::value;
    const int64_t vectors = x.numel() / V;
    const auto blocks = static_cast<unsigned>(ceil_div(vectors, kThreads * kLoads));
    auto run = [&](auto kernel) {
      DELT_LAUNCH(kernel, blocks, kThreads, 0, stream, in, out, static_cast<index_t>(vectors),
                  static_cast<index_t>(HW), static_cast<index_t>(C), static_cast<index_t>(row),
                  table.const_data_ptr<acc_t>());
    };
    if (channels_last) {
      run(batch_stat_backward_kernel<scalar_t, acc_t, V, true, index_t>);
    } else {
      run(batch_stat_backward_kernel<scalar_t, acc_t, V, false, index_t>);
    }
  });
}

inline at::Tensor batch_stat_backward(const at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                      const c10::optional<at::Tensor>& grad_scale) {
  const char* op = "delt_ext::batch_stat_backward";
  check_stat_input(x, op);
  check_channel_vector(mean, x, "mean", op);
  check_channel_vector(grad_mean, x, "grad_mean", op);
  check_channel_vector(grad_var, x, "grad_var", op);
  check_grad_scale(grad_scale, x, op);
  DELT_DEVICE_GUARD(x);
  const auto [xs, supported] = supported_layout(x);
  const Layout layout = cuda_layout(xs, supported);
  const auto acc = accumulate_type(x.scalar_type());
  const at::Tensor m = mean.contiguous(), gm = grad_mean.contiguous(), gv = grad_var.contiguous();
  const at::Tensor scale =
      grad_scale.has_value() ? grad_scale->to(acc).reshape({}).contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(xs);
  if (dx.numel() == 0) return with_strides_of(dx, x);
  const bool small = xs.numel() < std::numeric_limits<uint32_t>::max() / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_stat_backward", [&] {
        if (small) {
          launch_backward<scalar_t, uint32_t>(xs, layout, m, gm, gv, scale, dx);
        } else {
          launch_backward<scalar_t, uint64_t>(xs, layout, m, gm, gv, scale, dx);
        }
      });
  return with_strides_of(dx, x);
}

// ---- grouped statistics (bn_stat_loss_grouped, grouped_stat_backward) ----------------------
//
// Sample n belongs to group index[n] in [0, G); each group gets its own statistics, shift (the
// first value of the channel in the group's first sample) and loss (csrc/cpu/bn_stat_kernel.cpp).
// The samples are sorted by group on the device (a stable sort of the index and a search for
// each group's first position: no host sync), then:
//   1. partial sums of every "unit": a piece (<= kGroupPiece values) of one (n, c) plane in NCHW,
//      one warp per unit; or a block of rows of one sample in channels_last (the ungrouped
//      column kernel, one unit per blockIdx.y step);
//   2. finalize: one block per group merges the partials of its samples in sample order (a fixed
//      lane split and tree per channel), repairs non-finite channels exactly, and writes the
//      group's statistics, loss and coefficients; a group without samples gets NaN statistics,
//      loss 0 and coefficients 0;
//   3. the weighted total over the groups, one block, fixed order.
// An index outside [0, G) fails a device-side check. Backward: per-(group, channel)
// coefficients, then the elementwise pass, looking up each sample's group.

constexpr int64_t kGroupPiece = 4096;  // NCHW: values of a plane per partial sum, at most

// Samples sorted by group: order (N,), offsets (G + 1,) with group g = order[offsets[g] :
// offsets[g + 1]], first (G,) = each group's first sample (any valid sample when empty).
struct GroupPlan {
  at::Tensor order, offsets, first;
};

inline GroupPlan plan_groups(const at::Tensor& group_index, int64_t G) {
  const at::Tensor index = group_index.contiguous();
  auto [sorted, order] = at::sort(index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor bounds = at::arange(G + 1, index.options());
  // offsets[g] = how many indices are < g; an index outside [0, G) shows as offsets[0] != 0 or
  // offsets[G] != N, which the kernels check.
  at::Tensor offsets = at::searchsorted(sorted, bounds);
  at::Tensor first =
      order.index_select(0, offsets.slice(0, 0, G).clamp_max(index.size(0) - 1)).contiguous();
  return {order.contiguous(), offsets.contiguous(), first};
}

__host__ __device__ inline bool groups_in_range(const int64_t* offsets, int64_t G, int64_t N) {
  return offsets[0] == 0 && offsets[G] == N;
}

// NCHW: warp w sums unit u = (n * C + c) * pieces + piece (memory order), the values
// [piece * kGroupPiece, ...) of plane (n, c), shifted by its group's shift.
template <typename scalar_t, typename acc_t, int LOAD>
__global__ void __launch_bounds__(kThreads)
    grouped_nchw_partial_sums(const scalar_t* __restrict__ x, const int64_t* __restrict__ index,
                              const int64_t* __restrict__ first, int64_t G, int64_t C, int64_t HW,
                              int64_t pieces, int64_t units, acc_t* __restrict__ partial) {
  constexpr int W = group_width<scalar_t>();
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; unit < units;
       unit += warps) {  // uniform across the warp
    const int64_t plane = unit / pieces, piece = unit % pieces;
    const int64_t n = plane / C, c = plane % C;
    const int64_t g = index[n];
    DELT_DEVICE_CHECK(g >= 0 && g < G,
                      "delt_ext::bn_stat_loss_grouped: a group_index is out of range");
    const acc_t shift = shift_of(static_cast<acc_t>(x[(first[g] * C + c) * HW]));
    const int64_t lo = piece * kGroupPiece;
    const int64_t len = HW - lo < kGroupPiece ? HW - lo : kGroupPiece;  // no ODR-use on device
    const scalar_t* p = x + plane * HW + lo;
    const int64_t packs_total = ceil_div(len, W);
    acc_t s1 = 0, s2 = 0;
    for (int64_t q0 = lane; q0 < packs_total; q0 += 32 * kLoads) {
      Pack<scalar_t, W> packs[kLoads];
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        const int64_t q = q0 + j * 32;
        if (q < packs_total) {
          packs[j] = load_group<scalar_t, W, LOAD>([&](int k) { return p + q * W + k; },
                                                   [&](int k) { return q * W + k < len; });
        }
      }
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        const int64_t q = q0 + j * 32;
        if (q < packs_total) {
#pragma unroll
          for (int k = 0; k < W; ++k) {
            if (q * W + k < len) {
              const acc_t d = static_cast<acc_t>(packs[j].v[k]) - shift;
              s1 += d;
              s2 += d * d;
            }
          }
        }
      }
    }
    s1 = warp_sum(s1);
    s2 = warp_sum(s2);
    if (lane == 0) {
      partial[unit * 2] = s1;
      partial[unit * 2 + 1] = s2;
    }
  }
}

// channels_last: as channels_last_partial_sums, for units u = n * pieces + piece (the rows
// [n * HW + piece * rows_per_piece, ...) of sample n, within the sample), blockIdx.y striding
// over the units; partial[(u * C + c) * 2].
template <typename scalar_t, typename acc_t, int LOAD>
__global__ void __launch_bounds__(kThreads)
    grouped_channels_last_partial_sums(const scalar_t* __restrict__ x,
                                       const int64_t* __restrict__ index,
                                       const int64_t* __restrict__ first, int64_t G, int64_t HW,
                                       int64_t C, int64_t rows_per_piece, int64_t pieces,
                                       int64_t units, acc_t* __restrict__ partial) {
  constexpr int W = group_width<scalar_t>();
  DELT_DYNAMIC_SHARED(unsigned char, shared_raw);
  acc_t* shared = reinterpret_cast<acc_t*>(shared_raw);  // [blockDim.y][blockDim.x][W][2]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + tx) * W;
  const bool active = c0 < C;
  for (int64_t unit = blockIdx.y; unit < units; unit += gridDim.y) {  // uniform across the block
    const int64_t n = unit / pieces, piece = unit % pieces;
    const int64_t g = index[n];
    DELT_DEVICE_CHECK(g >= 0 && g < G,
                      "delt_ext::bn_stat_loss_grouped: a group_index is out of range");
    const int64_t r_begin = n * HW + piece * rows_per_piece;
    const int64_t r_end = std::min<int64_t>(n * HW + HW, r_begin + rows_per_piece);
    const scalar_t* first_row = x + first[g] * HW * C;
    acc_t shift[W], s1[W], s2[W];
#pragma unroll
    for (int k = 0; k < W; ++k) {
      shift[k] = active && c0 + k < C ? shift_of(static_cast<acc_t>(first_row[c0 + k])) : acc_t(0);
      s1[k] = 0;
      s2[k] = 0;
    }
    if (active) {
      for (int64_t r0 = r_begin + ty; r0 < r_end; r0 += static_cast<int64_t>(blockDim.y) * kLoads) {
        Pack<scalar_t, W> packs[kLoads];
#pragma unroll
        for (int j = 0; j < kLoads; ++j) {
          const int64_t r = r0 + static_cast<int64_t>(j) * blockDim.y;
          if (r < r_end) {
            const scalar_t* row = x + r * C + c0;
            packs[j] = load_group<scalar_t, W, LOAD>([&](int k) { return row + k; },
                                                     [&](int k) { return c0 + k < C; });
          }
        }
#pragma unroll
        for (int j = 0; j < kLoads; ++j) {
          if (r0 + static_cast<int64_t>(j) * blockDim.y < r_end) {
#pragma unroll
            for (int k = 0; k < W; ++k) {
              const acc_t d = static_cast<acc_t>(packs[j].v[k]) - shift[k];
              s1[k] += d;
              s2[k] += d * d;
            }
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < W; ++k) {
      acc_t* slot = shared + ((static_cast<int64_t>(ty) * blockDim.x + tx) * W + k) * 2;
      slot[0] = s1[k];
      slot[1] = s2[k];
    }
    __syncthreads();
    if (ty == 0 && active) {
      for (int k = 0; k < W && c0 + k < C; ++k) {
        acc_t a = 0, b = 0;
        for (int t = 0; t < static_cast<int>(blockDim.y); ++t) {
          const acc_t* slot = shared + ((static_cast<int64_t>(t) * blockDim.x + tx) * W + k) * 2;
          a += slot[0];
          b += slot[1];
        }
        acc_t* out = partial + (unit * C + c0 + k) * 2;
        out[0] = a;
        out[1] = b;
      }
    }
    __syncthreads();  // the shared slots are rewritten for the next unit
  }
}

// Exact float64 two-pass mean and biased variance of channel c over the `count` samples
// order[0 : count] by the whole block (fixed order, as exact_channel_moments). Valid in every
// thread.
template <typename scalar_t>
__device__ void exact_group_moments(const scalar_t* __restrict__ x, int64_t C, int64_t HW,
                                    bool channels_last, const int64_t* __restrict__ order,
                                    int64_t count, int64_t c, double& mean, double& var) {
  __shared__ double result[2];
  const int64_t M = count * HW;
  auto at = [&](int64_t e) {
    const int64_t n = order[e / HW], i = e % HW;
    return static_cast<double>(channels_last ? x[(n * HW + i) * C + c] : x[(n * C + c) * HW + i]);
  };
  double sum = 0.0, unused = 0.0;
  for (int64_t e = threadIdx.x; e < M; e += blockDim.x) sum += at(e);
  block_sum2(sum, unused);
  if (threadIdx.x == 0) result[0] = sum / static_cast<double>(M);
  __syncthreads();
  mean = result[0];
  double squares = 0.0;
  unused = 0.0;
  for (int64_t e = threadIdx.x; e < M; e += blockDim.x) {
    const double d = at(e) - mean;
    squares += d * d;
  }
  block_sum2(squares, unused);
  if (threadIdx.x == 0) result[1] = squares / static_cast<double>(M);
  __syncthreads();
  var = result[1];
  __syncthreads();
}

// Block g: group g. Lanes of `lanes` threads (a power of two <= 32) merge one channel each: lane
// l adds the partials l, l + lanes, ... of the group's (sample, piece) sequence, then a fixed
// shuffle tree. Partial of (sample n, piece, channel c) at (n * stride_n + piece * stride_piece +
// c * stride_c) * 2.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grouped_finalize(const scalar_t* __restrict__ x, bool channels_last, int64_t N, int64_t HW,
                     int64_t C, int64_t pieces, int64_t stride_n, int64_t stride_piece,
                     int64_t stride_c, int lanes, const int64_t* __restrict__ order,
                     const int64_t* __restrict__ offsets, const acc_t* __restrict__ partial,
                     const acc_t* __restrict__ target_mean, const acc_t* __restrict__ target_var,
                     acc_t* __restrict__ mean, acc_t* __restrict__ var, acc_t* __restrict__ coef,
                     acc_t* __restrict__ group_loss) {
  __shared__ int any_inexact;
  __shared__ double norms[2];
  const int64_t g = blockIdx.x, G = gridDim.x;
  const int tid = threadIdx.x;
  DELT_DEVICE_CHECK(groups_in_range(offsets, G, N),
                    "delt_ext::bn_stat_loss_grouped: a group_index is out of range");
  const int64_t begin = offsets[g], count = offsets[g + 1] - begin;
  acc_t* mean_g = mean + g * C;
  acc_t* var_g = var + g * C;
  acc_t* a_g = coef + g * C;        // dL_g/dmean_g
  acc_t* b_g = coef + (G + g) * C;  // dL_g/dvar_g
  if (count == 0) {                 // uniform: no samples, NaN statistics, nothing to the loss
    for (int64_t c = tid; c < C; c += blockDim.x) {
      mean_g[c] = var_g[c] = static_cast<acc_t>(NAN);
      a_g[c] = b_g[c] = acc_t(0);
    }
    if (tid == 0) group_loss[g] = acc_t(0);
    return;
  }
  const int64_t* samples = order + begin;
  const double M = static_cast<double>(count * HW);
  const int64_t terms = count * pieces;
  const int lane = tid % lanes;
  const int64_t per_pass = blockDim.x / lanes;
  const scalar_t* first = x + (channels_last ? samples[0] * HW * C : samples[0] * C * HW);
  const int64_t shift_stride = channels_last ? 1 : HW;
  auto stage = [&](int64_t c, double mu, double v) {
    mean_g[c] = static_cast<acc_t>(mu);
    var_g[c] = static_cast<acc_t>(v);
    a_g[c] =
        static_cast<acc_t>(as_returned<acc_t>(mu) - static_cast<double>(target_mean[g * C + c]));
    b_g[c] = static_cast<acc_t>(as_returned<acc_t>(v) - static_cast<double>(target_var[g * C + c]));
  };
  if (tid == 0) any_inexact = 0;
  __syncthreads();
  for (int64_t c_base = 0; c_base < C; c_base += per_pass) {
    const int64_t c = c_base + tid / lanes;
    double a = 0.0, b = 0.0;
    if (c < C) {
      for (int64_t t = lane; t < terms; t += lanes) {
        const int64_t slot =
            (samples[t / pieces] * stride_n + (t % pieces) * stride_piece + c * stride_c) * 2;
        a += static_cast<double>(partial[slot]);
        b += static_cast<double>(partial[slot + 1]);
      }
    }
    for (int offset = lanes / 2; offset > 0; offset >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, offset, lanes);
      b += __shfl_down_sync(0xffffffffu, b, offset, lanes);
    }
    if (lane == 0 && c < C) {
      if (!is_finite(a) || !is_finite(b)) {
        var_g[c] = acc_t(-1);  // marks the channel for the exact pass below
        any_inexact = 1;
      } else {
        const double d = a / M;
        const double mu =
            static_cast<double>(shift_of(static_cast<acc_t>(first[c * shift_stride]))) + d;
        stage(c, mu, fmax(b / M - d * d, 0.0));
      }
    }
  }
  __syncthreads();
  if (any_inexact != 0) {  // uniform across the block
    for (int64_t c = 0; c < C; ++c) {
      if (!(var_g[c] == acc_t(-1))) continue;  // uniform
      double mu = 0.0, v = 0.0;
      __syncthreads();
      exact_group_moments(x, C, HW, channels_last, samples, count, c, mu, v);
      if (tid == 0) stage(c, mu, v);
      __syncthreads();
    }
  }
  double ss_mean = 0.0, ss_var = 0.0;
  for (int64_t c = tid; c < C; c += blockDim.x) {
    const double dm = static_cast<double>(a_g[c]), dv = static_cast<double>(b_g[c]);
    ss_mean += dm * dm;
    ss_var += dv * dv;
  }
  block_sum2(ss_mean, ss_var);
  if (tid == 0) {
    norms[0] = sqrt(ss_mean);
    norms[1] = sqrt(ss_var);
    group_loss[g] = static_cast<acc_t>(norms[0] + norms[1]);
  }
  __syncthreads();
  for (int64_t c = tid; c < C; c += blockDim.x) {
    a_g[c] =
        norms[0] == 0.0 ? acc_t(0) : static_cast<acc_t>(static_cast<double>(a_g[c]) / norms[0]);
    b_g[c] =
        norms[1] == 0.0 ? acc_t(0) : static_cast<acc_t>(static_cast<double>(b_g[c]) / norms[1]);
  }
}

// loss = sum_g weight_g * group_loss_g over the groups with samples (float64, fixed order).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grouped_total(int64_t G, const int64_t* __restrict__ offsets,
                  const acc_t* __restrict__ group_loss, const acc_t* __restrict__ weight,
                  acc_t* __restrict__ loss) {
  double total = 0.0, unused = 0.0;
  for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
    if (offsets[g + 1] == offsets[g]) continue;
    const double w = weight != nullptr ? static_cast<double>(weight[g]) : 1.0;
    total += w * static_cast<double>(group_loss[g]);
  }
  block_sum2(total, unused);
  if (threadIdx.x == 0) *loss = static_cast<acc_t>(total);
}

// Fills group_loss, mean, var, coef and loss of the grouped loss (bn_stat_loss_grouped).
template <typename scalar_t>
void launch_grouped_moments(const at::Tensor& xs, Layout layout, const at::Tensor& index,
                            const GroupPlan& plan, int64_t G, const at::Tensor& tm,
                            const at::Tensor& tv, const at::Tensor& w, at::Tensor& mean,
                            at::Tensor& var, at::Tensor& coef, at::Tensor& group_loss,
                            at::Tensor& loss) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = xs.size(0), C = xs.size(1), HW = xs.size(2) * xs.size(3);
  const auto options = mean.options();
  const cudaStream_t stream = cuda::current_stream();
  constexpr int W = group_width<scalar_t>();
  const scalar_t* data = xs.const_data_ptr<scalar_t>();
  at::Tensor partial;
  int64_t pieces = 1, stride_n = 0, stride_piece = 0, stride_c = 0;
  if (layout == Layout::kNCHW) {
    pieces = ceil_div(HW, kGroupPiece);
    const int64_t units = N * C * pieces;
    stride_n = C * pieces, stride_c = pieces, stride_piece = 1;
    partial = at::empty({units, 2}, options);
    const int vec = vector_width<scalar_t>(HW, {data});
    const int64_t blocks = std::min<int64_t>(ceil_div(units, kThreads / 32), 1 << 20);
    DELT_RECORD(channels_last, false);
    DELT_RECORD(load_width, vec);
    DELT_RECORD(grid_x, blocks);
    DELT_RECORD(grid_y, 1);
    with_width<scalar_t>(vec, [&](auto width) {
      auto kernel = grouped_nchw_partial_sums<scalar_t, acc_t, decltype(width)::value>;
      DELT_LAUNCH(kernel, static_cast<unsigned>(blocks), kThreads, 0, stream, data,
                  index.const_data_ptr<int64_t>(), plan.first.const_data_ptr<int64_t>(), G, C, HW,
                  pieces, units, partial.mutable_data_ptr<acc_t>());
    });
  } else {
    const int vec = vector_width<scalar_t>(C, {data});
    const int64_t channel_groups = ceil_div(C, W);
    const int tx = std::min(next_pow2(channel_groups), 32);
    const int ty = kThreads / tx;
    const int64_t blocks_x = ceil_div(channel_groups, tx);
    TORCH_CHECK(blocks_x <= std::numeric_limits<int32_t>::max(), "delt_ext: too many channels");
    // Rows per unit: enough units to fill the GPU, at least ty * kLoads rows each.
    const int64_t wanted = std::max<int64_t>(1, ceil_div(kTargetBlocks, blocks_x));
    const int64_t rows_per_piece = std::min<int64_t>(
        HW, std::max<int64_t>(static_cast<int64_t>(ty) * kLoads, ceil_div(N * HW, wanted)));
    pieces = ceil_div(HW, rows_per_piece);
    const int64_t units = N * pieces;
    stride_n = pieces * C, stride_piece = C, stride_c = 1;
    partial = at::empty({units * C, 2}, options);
    const dim3 grid(static_cast<unsigned>(blocks_x),
                    static_cast<unsigned>(std::min<int64_t>(units, 65535)));
    const dim3 block(tx, ty);
    const size_t shared = static_cast<size_t>(kThreads) * W * 2 * sizeof(acc_t);
    DELT_RECORD(channels_last, true);
    DELT_RECORD(load_width, vec);
    DELT_RECORD(grid_x, blocks_x);
    DELT_RECORD(grid_y, grid.y);
    with_width<scalar_t>(vec, [&](auto width) {
      auto kernel = grouped_channels_last_partial_sums<scalar_t, acc_t, decltype(width)::value>;
      DELT_LAUNCH(kernel, grid, block, shared, stream, data, index.const_data_ptr<int64_t>(),
                  plan.first.const_data_ptr<int64_t>(), G, HW, C, rows_per_piece, pieces, units,
                  partial.mutable_data_ptr<acc_t>());
    });
  }
  // Lanes per channel: enough for the average group's partials, at most a warp.
  const int lanes = std::min(next_pow2(ceil_div(N * pieces, G)), 32);
  auto finalize = grouped_finalize<scalar_t, acc_t>;
  DELT_LAUNCH(finalize, static_cast<unsigned>(G), kThreads, 0, stream, data,
              layout == Layout::kChannelsLast, N, HW, C, pieces, stride_n, stride_piece, stride_c,
              lanes, plan.order.const_data_ptr<int64_t>(), plan.offsets.const_data_ptr<int64_t>(),
              partial.const_data_ptr<acc_t>(), tm.const_data_ptr<acc_t>(),
              tv.const_data_ptr<acc_t>(), mean.mutable_data_ptr<acc_t>(),
              var.mutable_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>(),
              group_loss.mutable_data_ptr<acc_t>());
  auto total = grouped_total<acc_t>;
  DELT_LAUNCH(total, 1, kThreads, 0, stream, G, plan.offsets.const_data_ptr<int64_t>(),
              group_loss.const_data_ptr<acc_t>(), w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
              loss.mutable_data_ptr<acc_t>());
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stat_loss_grouped(
    const at::Tensor& x, const at::Tensor& group_index, const at::Tensor& target_mean,
    const at::Tensor& target_var, const c10::optional<at::Tensor>& weight) {
  const char* op = "delt_ext::bn_stat_loss_grouped";
  check_stat_input(x, op);
  check_group_index(group_index, x, op);
  const int64_t G = check_group_target(target_mean, x, "target_mean", op);
  check_group_target(target_var, x, "target_var", op);
  TORCH_CHECK(target_var.size(0) == G, op,
              ": target_mean and target_var must have the same shape, got ", target_mean.sizes(),
              " and ", target_var.sizes());
  check_group_weight(weight, G, x, op);
  TORCH_CHECK(G <= std::numeric_limits<int32_t>::max(), op, ": too many groups: ", G);
  DELT_DEVICE_GUARD(x);
  const auto [xs, supported] = supported_layout(x);
  const Layout layout = cuda_layout(xs, supported);
  const int64_t C = x.size(1);
  const auto options = x.options().dtype(accumulate_type(x.scalar_type()));
  const at::Tensor tm = target_mean.to(options.dtype()).contiguous();
  const at::Tensor tv = target_var.to(options.dtype()).contiguous();
  const at::Tensor w = weight.has_value() ? weight->to(options.dtype()).contiguous() : at::Tensor();
  const GroupPlan plan = plan_groups(group_index, G);
  const at::Tensor index = group_index.contiguous();
  at::Tensor mean = at::empty({G, C}, options), var = at::empty({G, C}, options);
  at::Tensor coef = at::empty({2, G, C}, options), group_loss = at::empty({G}, options);
  at::Tensor loss = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_loss_grouped", [&] {
        launch_grouped_moments<scalar_t>(xs, layout, index, plan, G, tm, tv, w, mean, var, coef,
                                         group_loss, loss);
      });
  return {loss, group_loss, mean, var, coef};
}

// table = [c1; c2; mean] over (group, channel) entries i = g * C + c, rows of `row` values:
// c1 = s_g * grad_mean_i / M_g, c2 = 2 s_g * grad_var_i / M_g, M_g = the group's count * HW.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grouped_backward_coefficients(int64_t G, int64_t C, int64_t N, int64_t HW, int64_t row,
                                  const int64_t* __restrict__ offsets,
                                  const acc_t* __restrict__ mean,
                                  const acc_t* __restrict__ grad_mean,
                                  const acc_t* __restrict__ grad_var,
                                  const acc_t* __restrict__ grad_scale, int64_t scale_stride,
                                  acc_t* __restrict__ table) {
  DELT_DEVICE_CHECK(groups_in_range(offsets, G, N),
                    "delt_ext::grouped_stat_backward: a group_index is out of range");
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < G * C;
       i += stride) {
    const int64_t g = i / C, count = offsets[g + 1] - offsets[g];
    const acc_t scale = grad_scale != nullptr ? grad_scale[g * scale_stride] : acc_t(1);
    const acc_t inv_count =
        count > 0 ? static_cast<acc_t>(1.0 / static_cast<double>(count * HW)) : acc_t(0);
    table[i] = scale * grad_mean[i] * inv_count;
    table[row + i] = 2 * scale * grad_var[i] * inv_count;
    table[2 * row + i] = mean[i];
  }
}

// dx = c1 + c2 * (x - mean) with the entry of the element's (group, channel); vectors as in
// batch_stat_backward_kernel.
template <typename scalar_t, typename acc_t, int VEC, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kThreads)
    grouped_backward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                            const int64_t* __restrict__ index, index_t vectors, index_t HW,
                            index_t C, index_t row, const acc_t* __restrict__ table) {
  const index_t base = static_cast<index_t>(blockIdx.x) * (kThreads * kLoads) + threadIdx.x;
  Pack<scalar_t, VEC> in[kLoads];
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const index_t v = base + j * kThreads;
    if (v < vectors) in[j] = cuda::load<Pack<scalar_t, VEC>>(x + v * VEC);
  }
#pragma unroll
  for (int j = 0; j < kLoads; ++j) {
    const index_t v = base + j * kThreads;
    if (v >= vectors) continue;
    Pack<scalar_t, VEC> out;
    const index_t e = v * VEC;
    if constexpr (kChannelsLast) {
      const index_t c0 = e % C;
      const index_t i0 = static_cast<index_t>(index[e / (HW * C)]) * C + c0;
      const auto c1 = cuda::load<Pack<acc_t, VEC>>(table + i0);
      const auto c2 = cuda::load<Pack<acc_t, VEC>>(table + row + i0);
      const auto mu = cuda::load<Pack<acc_t, VEC>>(table + 2 * row + i0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.v[k] =
            static_cast<scalar_t>(c1.v[k] + c2.v[k] * (static_cast<acc_t>(in[j].v[k]) - mu.v[k]));
      }
    } else {
      const index_t plane = e / HW;
      const index_t i = static_cast<index_t>(index[plane / C]) * C + plane % C;
      const acc_t c1 = table[i], c2 = table[row + i], mu = table[2 * row + i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.v[k] = static_cast<scalar_t>(c1 + c2 * (static_cast<acc_t>(in[j].v[k]) - mu));
      }
    }
    cuda::store(dx + v * VEC, out);
  }
}

// dx of grouped_stat_backward: the coefficient table, then the elementwise pass.
template <typename scalar_t, typename index_t>
void launch_grouped_backward(const at::Tensor& xs, Layout layout, const at::Tensor& index,
                             const at::Tensor& offsets, int64_t G, const at::Tensor& m,
                             const at::Tensor& gm, const at::Tensor& gv, const at::Tensor& scale,
                             int64_t scale_stride, at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = xs.size(0), C = xs.size(1), HW = xs.size(2) * xs.size(3);
  const cudaStream_t stream = cuda::current_stream();
  const int64_t row = ceil_div(G * C, kTableAlign) * kTableAlign;
  at::Tensor table = at::empty({3, row}, m.options());
  auto coefficients = grouped_backward_coefficients<acc_t>;
  DELT_LAUNCH(coefficients,
              static_cast<unsigned>(std::min<int64_t>(ceil_div(G * C, kThreads), 1024)), kThreads,
              0, stream, G, C, N, HW, row, offsets.const_data_ptr<int64_t>(),
              m.const_data_ptr<acc_t>(), gm.const_data_ptr<acc_t>(), gv.const_data_ptr<acc_t>(),
              scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr, scale_stride,
              table.mutable_data_ptr<acc_t>());
  const scalar_t* in = xs.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  const bool channels_last = layout == Layout::kChannelsLast;
  const int vec = vector_width<scalar_t>(channels_last ? C : HW, {in, out});
  DELT_RECORD(backward_width, vec);
  with_width<scalar_t>(vec, [&](auto width) {
    constexpr int V = decltype(width)::value;
    const int64_t vectors = xs.numel() / V;
    const auto blocks = static_cast<unsigned>(ceil_div(vectors, kThreads * kLoads));
    auto run = [&](auto kernel) {
      DELT_LAUNCH(kernel, blocks, kThreads, 0, stream, in, out, index.const_data_ptr<int64_t>(),
                  static_cast<index_t>(vectors), static_cast<index_t>(HW), static_cast<index_t>(C),
                  static_cast<index_t>(row), table.const_data_ptr<acc_t>());
    };
    if (channels_last) {
      run(grouped_backward_kernel<scalar_t, acc_t, V, true, index_t>);
    } else {
      run(grouped_backward_kernel<scalar_t, acc_t, V, false, index_t>);
    }
  });
}

inline at::Tensor grouped_stat_backward(const at::Tensor& x, const at::Tensor& group_index,
                                        const at::Tensor& mean, const at::Tensor& grad_mean,
                                        const at::Tensor& grad_var,
                                        const c10::optional<at::Tensor>& grad_scale) {
  const char* op = "delt_ext::grouped_stat_backward";
  check_stat_input(x, op);
  check_group_index(group_index, x, op);
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) >= 1, op,
              ": mean must be a (G, C) tensor, got shape ", mean.sizes());
  const int64_t G = mean.size(0);
  check_group_table(mean, x, G, "mean", op);
  check_group_table(grad_mean, x, G, "grad_mean", op);
  check_group_table(grad_var, x, G, "grad_var", op);
  check_group_scale(grad_scale, G, x, op);
  DELT_DEVICE_GUARD(x);
  const auto [xs, supported] = supported_layout(x);
  const Layout layout = cuda_layout(xs, supported);
  const auto acc = accumulate_type(x.scalar_type());
  const at::Tensor m = mean.contiguous(), gm = grad_mean.contiguous(), gv = grad_var.contiguous();
  const at::Tensor scale =
      grad_scale.has_value() ? grad_scale->to(acc).reshape({-1}).contiguous() : at::Tensor();
  const int64_t scale_stride = scale.defined() && scale.numel() > 1 ? 1 : 0;
  const at::Tensor index = group_index.contiguous();
  // offsets[g] = how many indices are < g (the counts, and the range check).
  const at::Tensor offsets =
      at::searchsorted(std::get<0>(at::sort(index, /*stable=*/true, 0, false)),
                       at::arange(G + 1, index.options()))
          .contiguous();
  at::Tensor dx = at::empty_like(xs);
  const bool small = xs.numel() < std::numeric_limits<uint32_t>::max() / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_stat_backward", [&] {
        if (small) {
          launch_grouped_backward<scalar_t, uint32_t>(xs, layout, index, offsets, G, m, gm, gv,
                                                      scale, scale_stride, dx);
        } else {
          launch_grouped_backward<scalar_t, uint64_t>(xs, layout, index, offsets, G, m, gm, gv,
                                                      scale, scale_stride, dx);
        }
      });
  return with_strides_of(dx, x);
}

}  // namespace bn_cuda
}  // namespace delt_ext
