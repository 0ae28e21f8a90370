// CPU kernels of the BN-statistic ops (schemas in csrc/bn_stat.cpp).
//
// Statistics. For channel c with M = N*H*W values and shift K_c (the channel's first value):
//   S1 = sum(x - K_c),  S2 = sum((x - K_c)^2),  mean = K_c + S1/M,  var = S2/M - (S1/M)^2.
// A shift taken from the data keeps both terms of var of the order of var itself, so a large
// mean (1e4 with std 1 in float32) costs no precision (the shifted-data algorithm), and partial
// sums merge by plain addition. A non-finite first value gives K_c = 0.
//
// Non-finite values. A channel whose merged S1 or S2 is not finite (a NaN or an infinity in x,
// or sums that overflowed, e.g. an outlier 1e37 as the shift of float32 data) is recomputed
// exactly: a two-pass mean and variance in float64 over the channel, which gives what the eager
// formula gives (NaN for NaN, +-inf means and NaN variances for infinities, finite means of
// huge values). Ordinary finite data never take that path, so their results are unchanged.
// In the loss, a statistic that overflows the returned dtype enters as that overflowed value
// (inf), as in the eager formula; a NaN norm gives NaN coefficients for every channel (the
// gradient of a NaN loss is NaN everywhere, as autograd gives); only a zero norm gives 0.
//
// Determinism. Each partial sum covers a fixed block of elements (kChunkElements for NCHW,
// rows_per_chunk rows for channels_last), accumulated in float32 lanes (float64 for float64
// input) and folded in a fixed order; partials are added in float64 in chunk order. Results are
// therefore bitwise independent of the thread count.
//
// Loss. L = ||mean - running_mean||_2 + ||var - running_var||_2 with
//   a_c = dL/dmean_c = (mean_c - running_mean_c) / ||mean - running_mean||   (0 at a zero norm,
//   b_c = dL/dvar_c  = (var_c - running_var_c) / ||var - running_var||        as autograd's norm)
// Backward (the path through the mean in var cancels, since sum(x - mean) = 0):
//   dx = g * (a_c + 2 b_c (x - mean_c)) / M:  one read of x and one write, no reduction.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bn_stat.h"
#include "cpu/vec.h"

namespace delt_ext {
namespace {

constexpr int64_t kChunkElements = 4096;   // NCHW: elements per partial sum
constexpr int64_t kChunkRowsMax = 512;     // channels_last: rows per partial sum, at most
constexpr int64_t kGrainElements = 32768;  // smallest amount of work given to a thread

using cpu::broadcast;
using cpu::kLanes;
using cpu::load_unaligned;
using cpu::store_unaligned;
using cpu::vec_t;

// ---- hot loops (raw pointers, multi-versioned; T is float or double) ---------------------------

// Adds the sums of (p[i] - shift) and (p[i] - shift)^2 over n contiguous values to sum1, sum2:
// two lane vectors of partial sums, folded in a fixed order.
template <typename T>
DELT_CPU_CLONES void shifted_sums(const T* p, int64_t n, T shift, double* sum1, double* sum2) {
  using V = vec_t<T>;
  constexpr int W = kLanes<T>;
  const V k = broadcast<V>(shift);
  V a1 = {}, a2 = {}, b1 = {}, b2 = {};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const V d0 = load_unaligned<V>(p + i) - k;
    const V d1 = load_unaligned<V>(p + i + W) - k;
    a1 += d0;
    a2 += d0 * d0;
    b1 += d1;
    b2 += d1 * d1;
  }
  a1 += b1;
  a2 += b2;
  T t1 = 0, t2 = 0;
  for (int j = 0; j < W; ++j) {
    t1 += a1[j];
    t2 += a2[j];
  }
  for (; i < n; ++i) {
    const T d = p[i] - shift;
    t1 += d;
    t2 += d * d;
  }
  *sum1 += t1;
  *sum2 += t2;
}

// Per-column sums of (x - shift) and its square over `rows` rows of a row-major (rows, C) block,
// added to sum1[c], sum2[c]. Four lane vectors of columns at a time (32 floats, 16 doubles), so
// the accumulators stay in registers while the block is streamed row by row.
template <typename T>
DELT_CPU_CLONES void column_shifted_sums(const T* x, int64_t rows, int64_t C, const T* shift,
                                         T* sum1, T* sum2) {
  using V = vec_t<T>;
  constexpr int W = kLanes<T>, kVectors = 4;
  int64_t c = 0;
  for (; c + kVectors * W <= C; c += kVectors * W) {
    V k[kVectors], s1[kVectors] = {}, s2[kVectors] = {};
    for (int v = 0; v < kVectors; ++v) k[v] = load_unaligned<V>(shift + c + W * v);
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = x + r * C + c;
      for (int v = 0; v < kVectors; ++v) {
        const V d = load_unaligned<V>(row + W * v) - k[v];
        s1[v] += d;
        s2[v] += d * d;
      }
    }
    for (int v = 0; v < kVectors; ++v) {
      for (int j = 0; j < W; ++j) {
        sum1[c + W * v + j] += s1[v][j];
        sum2[c + W * v + j] += s2[v][j];
      }
    }
  }
  for (; c < C; ++c) {
    T s1 = 0, s2 = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const T d = x[r * C + c] - shift[c];
      s1 += d;
      s2 += d * d;
    }
    sum1[c] += s1;
    sum2[c] += s2;
  }
}

// out[i] = c1 + c2 * (x[i] - mean) over n contiguous values (one channel of an NCHW plane).
template <typename T>
DELT_CPU_CLONES void centered_affine(const T* x, T* out, int64_t n, T c1, T c2, T mean) {
  for (int64_t i = 0; i < n; ++i) out[i] = c1 + c2 * (x[i] - mean);
}

// out[r, c] = c1[c] + c2[c] * (x[r, c] - mean[c]) over a row-major (rows, C) block; four lane
// vectors of columns at a time so the coefficients stay in registers.
template <typename T>
DELT_CPU_CLONES void rows_centered_affine(const T* x, T* out, int64_t rows, int64_t C, const T* c1,
                                          const T* c2, const T* mean) {
  using V = vec_t<T>;
  constexpr int W = kLanes<T>, kVectors = 4;
  int64_t c = 0;
  for (; c + kVectors * W <= C; c += kVectors * W) {
    V a[kVectors], k[kVectors], u[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      a[v] = load_unaligned<V>(c1 + c + W * v);
      k[v] = load_unaligned<V>(c2 + c + W * v);
      u[v] = load_unaligned<V>(mean + c + W * v);
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int v = 0; v < kVectors; ++v) {
        const V value = load_unaligned<V>(x + r * C + c + W * v);
        store_unaligned(out + r * C + c + W * v, a[v] + k[v] * (value - u[v]));
      }
    }
  }
  for (; c < C; ++c) {
    for (int64_t r = 0; r < rows; ++r) out[r * C + c] = c1[c] + c2[c] * (x[r * C + c] - mean[c]);
  }
}

inline bool is_finite(double v) { return v - v == 0.0; }  // false for NaN and +-inf

// The shift of a channel: its first value, or 0 when that is not finite.
template <typename acc_t>
inline acc_t shift_of(acc_t first) {
  return is_finite(static_cast<double>(first)) ? first : acc_t(0);
}

// Exact float64 mean and biased variance of channel c (two passes, in memory order).
template <typename scalar_t>
void exact_channel_moments(const scalar_t* data, Layout layout, int64_t N, int64_t C, int64_t HW,
                           int64_t c, double& mean, double& var) {
  auto at = [&](int64_t n, int64_t i) {
    return static_cast<double>(layout == Layout::kNCHW ? data[(n * C + c) * HW + i]
                                                       : data[(n * HW + i) * C + c]);
  };
  const double M = static_cast<double>(N * HW);
  double sum = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < HW; ++i) sum += at(n, i);
  }
  mean = sum / M;
  double squares = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < HW; ++i) {
      const double d = at(n, i) - mean;
      squares += d * d;
    }
  }
  var = squares / M;
}

// 16-bit inputs are widened to float (and results narrowed) through a small buffer, so every
// dtype runs the same float loops above.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* p, int64_t n, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return p;
  } else {
    buffer.resize(n);
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<acc_t>(p[i]);
    return buffer.data();
  }
}

// Per-channel float64 mean and biased variance of x (NCHW- or channels_last-contiguous).
template <typename scalar_t>
void channel_moments(const at::Tensor& x, Layout layout, std::vector<double>& mean,
                     std::vector<double>& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t M = N * HW;
  const scalar_t* data = x.const_data_ptr<scalar_t>();

  std::vector<acc_t> shift(C);
  int64_t chunks = 0;  // partial sums per channel
  std::vector<double> part1, part2;

  if (layout == Layout::kNCHW) {
    // A chunk is a run of whole planes (small H*W) or a piece of one plane (large H*W).
    const int64_t pieces = HW >= kChunkElements ? (HW + kChunkElements - 1) / kChunkElements : 1;
    const int64_t planes = HW >= kChunkElements ? 1 : kChunkElements / HW;
    chunks = pieces > 1 ? N * pieces : (N + planes - 1) / planes;
    for (int64_t c = 0; c < C; ++c) shift[c] = shift_of(static_cast<acc_t>(data[c * HW]));
    part1.assign(C * chunks, 0.0);  // [C][chunks]
    part2.assign(C * chunks, 0.0);
    if (pieces > 1) {
      // Tasks run in memory order (n, c, piece), so each thread streams through x.
      const int64_t grain = std::max<int64_t>(1, kGrainElements / kChunkElements);
      at::parallel_for(0, C * chunks, grain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buffer;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / (C * pieces), c = task / pieces % C, piece = task % pieces;
          const int64_t k = n * pieces + piece;
          const int64_t lo = piece * kChunkElements, len = std::min(HW, lo + kChunkElements) - lo;
          double s1 = 0.0, s2 = 0.0;
          shifted_sums(as_acc(data + (n * C + c) * HW + lo, len, buffer), len, shift[c], &s1, &s2);
          part1[c * chunks + k] = s1;
          part2[c * chunks + k] = s2;
        }
      });
    } else {
      // Task = (plane group k, block of channels): for each n of the group the block's planes
      // are adjacent in memory, so the thread streams. Every (c, k) partial is summed over n in
      // order by one task, so the block size (any) does not change the results.
      const int64_t block = std::clamp<int64_t>(kGrainElements / (planes * HW), 1, C);
      const int64_t blocks = (C + block - 1) / block;
      at::parallel_for(0, chunks * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buffer;
        std::vector<double> s1(block), s2(block);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t k = task / blocks, c0 = task % blocks * block;
          const int64_t c1 = std::min(C, c0 + block), n_end = std::min(N, (k + 1) * planes);
          std::fill(s1.begin(), s1.end(), 0.0);
          std::fill(s2.begin(), s2.end(), 0.0);
          for (int64_t n = k * planes; n < n_end; ++n) {
            for (int64_t c = c0; c < c1; ++c) {
              const acc_t* p = as_acc(data + (n * C + c) * HW, HW, buffer);
              shifted_sums(p, HW, shift[c], &s1[c - c0], &s2[c - c0]);
            }
          }
          for (int64_t c = c0; c < c1; ++c) {
            part1[c * chunks + k] = s1[c - c0];
            part2[c * chunks + k] = s2[c - c0];
          }
        }
      });
    }
  } else {
    // x is an (M, C) row-major matrix; a chunk is a block of rows, vectorized across channels.
    const int64_t rows = std::clamp<int64_t>(kChunkElements * 8 / C, 1, kChunkRowsMax);
    chunks = (M + rows - 1) / rows;
    for (int64_t c = 0; c < C; ++c) shift[c] = shift_of(static_cast<acc_t>(data[c]));
    part1.assign(chunks * C, 0.0);  // [chunks][C]
    part2.assign(chunks * C, 0.0);
    const int64_t grain = std::max<int64_t>(1, kGrainElements / (rows * C));
    at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s1(C), s2(C), buffer;
      for (int64_t k = begin; k < end; ++k) {
        std::fill(s1.begin(), s1.end(), acc_t(0));
        std::fill(s2.begin(), s2.end(), acc_t(0));
        const int64_t r0 = k * rows, n_rows = std::min(M, r0 + rows) - r0;
        const acc_t* p = as_acc(data + r0 * C, n_rows * C, buffer);
        column_shifted_sums(p, n_rows, C, shift.data(), s1.data(), s2.data());
        for (int64_t c = 0; c < C; ++c) {
          part1[k * C + c] = s1[c];
          part2[k * C + c] = s2[c];
        }
      }
    });
  }

  const int64_t stride_chunk = layout == Layout::kNCHW ? 1 : C;
  const int64_t stride_channel = layout == Layout::kNCHW ? chunks : 1;
  mean.resize(C);
  var.resize(C);
  std::vector<int64_t> inexact;  // channels whose shifted sums are not finite
  for (int64_t c = 0; c < C; ++c) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      s1 += part1[c * stride_channel + k * stride_chunk];
      s2 += part2[c * stride_channel + k * stride_chunk];
    }
    if (!is_finite(s1) || !is_finite(s2)) inexact.push_back(c);
    const double d = s1 / static_cast<double>(M);
    mean[c] = static_cast<double>(shift[c]) + d;
    var[c] = std::max(s2 / static_cast<double>(M) - d * d, 0.0);
  }
  const int64_t repairs = static_cast<int64_t>(inexact.size());
  at::parallel_for(0, repairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c = inexact[k];
      exact_channel_moments(data, layout, N, C, HW, c, mean[c], var[c]);
    }
  });
}

// Statistic s (float64) as the loss sees it: s itself, unless rounding it to the returned dtype
// overflows; then the overflowed value, as the eager formula computes with it.
template <typename acc_t>
inline double as_returned(double s) {
  const acc_t rounded = static_cast<acc_t>(s);
  return is_finite(static_cast<double>(rounded)) ? s : static_cast<double>(rounded);
}

template <typename T>
at::Tensor to_tensor(const std::vector<double>& values, const at::TensorOptions& options) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, options);
  T* p = out.mutable_data_ptr<T>();
  for (size_t i = 0; i < values.size(); ++i) p[i] = static_cast<T>(values[i]);
  return out;
}

std::vector<double> to_doubles(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

std::tuple<at::Tensor, at::Tensor> batch_mean_var_cpu(const at::Tensor& x) {
  check_stat_input(x, "delt_ext::batch_mean_var");
  const auto [xs, layout] = supported_layout(x);
  const auto options = x.options().dtype(accumulate_type(x.scalar_type()));
  std::vector<double> mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_mean_var",
                                  [&] { channel_moments<scalar_t>(xs, layout, mean, var); });
  if (options.dtype() == at::kDouble) {
    return {to_tensor<double>(mean, options), to_tensor<double>(var, options)};
  }
  return {to_tensor<float>(mean, options), to_tensor<float>(var, options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stat_loss_cpu(
    const at::Tensor& x, const at::Tensor& running_mean, const at::Tensor& running_var) {
  const char* op = "delt_ext::bn_stat_loss";
  check_stat_input(x, op);
  check_stat_target(running_mean, x, "running_mean", op);
  check_stat_target(running_var, x, "running_var", op);
  const auto [xs, layout] = supported_layout(x);
  const int64_t C = x.size(1);
  std::vector<double> mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_loss",
                                  [&] { channel_moments<scalar_t>(xs, layout, mean, var); });
  const std::vector<double> target_mean = to_doubles(running_mean);
  const std::vector<double> target_var = to_doubles(running_var);
  std::vector<double> dmean(C), dvar(C);
  double ss_mean = 0.0, ss_var = 0.0;
  const auto options = x.options().dtype(accumulate_type(x.scalar_type()));
  const bool is_double = options.dtype() == at::kDouble;
  for (int64_t c = 0; c < C; ++c) {
    const double m = is_double ? mean[c] : as_returned<float>(mean[c]);
    const double v = is_double ? var[c] : as_returned<float>(var[c]);
    dmean[c] = m - target_mean[c];
    dvar[c] = v - target_var[c];
    ss_mean += dmean[c] * dmean[c];
    ss_var += dvar[c] * dvar[c];
  }
  const double norm_mean = std::sqrt(ss_mean), norm_var = std::sqrt(ss_var);
  std::vector<double> coef(2 * C);
  for (int64_t c = 0; c < C; ++c) {
    // 0 only at a zero norm (autograd's subgradient); a NaN norm makes every coefficient NaN.
    coef[c] = norm_mean == 0.0 ? 0.0 : dmean[c] / norm_mean;
    coef[C + c] = norm_var == 0.0 ? 0.0 : dvar[c] / norm_var;
  }
  const std::vector<double> loss_value = {norm_mean + norm_var};
  if (options.dtype() == at::kDouble) {
    return {to_tensor<double>(loss_value, options).reshape({}), to_tensor<double>(mean, options),
            to_tensor<double>(var, options), to_tensor<double>(coef, options).view({2, C})};
  }
  return {to_tensor<float>(loss_value, options).reshape({}), to_tensor<float>(mean, options),
          to_tensor<float>(var, options), to_tensor<float>(coef, options).view({2, C})};
}

template <typename scalar_t>
void batch_stat_backward_kernel(const at::Tensor& x, Layout layout, const at::Tensor& mean,
                                const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                double scale, at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const double inv_m = 1.0 / static_cast<double>(N * HW);
  // dx = c1_c + c2_c * (x - mean_c); subtracting the mean first keeps precision for x >> std.
  std::vector<acc_t> c1(C), c2(C), mu(C);
  const at::Tensor m = mean.contiguous(), gm = grad_mean.contiguous(), gv = grad_var.contiguous();
  for (int64_t c = 0; c < C; ++c) {
    const double gm_c = static_cast<double>(gm.const_data_ptr<acc_t>()[c]);
    const double gv_c = static_cast<double>(gv.const_data_ptr<acc_t>()[c]);
    // g * grad is rounded to acc_t first, as when the caller scales the gradients itself (and
    // as the CUDA kernel computes): the fused scale gives the same bits as the unfused one.
    const double scaled_gm = static_cast<double>(static_cast<acc_t>(scale * gm_c));
    const double scaled_gv = static_cast<double>(static_cast<acc_t>(scale * gv_c));
    c1[c] = static_cast<acc_t>(scaled_gm * inv_m);
    c2[c] = static_cast<acc_t>(2.0 * scaled_gv * inv_m);
    mu[c] = m.const_data_ptr<acc_t>()[c];
  }
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  // Narrows a float block computed in `buffer` into out (16-bit dtypes only).
  auto narrow = [](const std::vector<acc_t>& buffer, scalar_t* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(buffer[i]);
  };
  if (layout == Layout::kNCHW) {
    at::parallel_for(0, N * C, std::max<int64_t>(1, kGrainElements / HW),
                     [&](int64_t b, int64_t e) {
                       std::vector<acc_t> buffer, result;
                       for (int64_t plane = b; plane < e; ++plane) {
                         const int64_t c = plane % C;
                         const acc_t* src = as_acc(in + plane * HW, HW, buffer);
                         if constexpr (std::is_same_v<scalar_t, acc_t>) {
                           centered_affine<acc_t>(src, out + plane * HW, HW, c1[c], c2[c], mu[c]);
                         } else {
                           result.resize(HW);
                           centered_affine<acc_t>(src, result.data(), HW, c1[c], c2[c], mu[c]);
                           narrow(result, out + plane * HW, HW);
                         }
                       }
                     });
  } else {
    const int64_t rows = std::max<int64_t>(1, kGrainElements / C);
    const int64_t blocks = (N * HW + rows - 1) / rows;
    at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> buffer, result;
      for (int64_t block = b; block < e; ++block) {
        const int64_t r0 = block * rows, n_rows = std::min(N * HW, r0 + rows) - r0;
        const acc_t* src = as_acc(in + r0 * C, n_rows * C, buffer);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          rows_centered_affine(src, out + r0 * C, n_rows, C, c1.data(), c2.data(), mu.data());
        } else {
          result.resize(n_rows * C);
          rows_centered_affine(src, result.data(), n_rows, C, c1.data(), c2.data(), mu.data());
          narrow(result, out + r0 * C, n_rows * C);
        }
      }
    });
  }
}

at::Tensor batch_stat_backward_cpu(const at::Tensor& x, const at::Tensor& mean,
                                   const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                   const c10::optional<at::Tensor>& grad_scale) {
  const char* op = "delt_ext::batch_stat_backward";
  check_stat_input(x, op);
  check_channel_vector(mean, x, "mean", op);
  check_channel_vector(grad_mean, x, "grad_mean", op);
  check_channel_vector(grad_var, x, "grad_var", op);
  check_grad_scale(grad_scale, x, op);
  const double scale = grad_scale.has_value() ? grad_scale->item<double>() : 1.0;
  const auto [xs, layout] = supported_layout(x);
  at::Tensor dx = at::empty_like(xs);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_stat_backward", [&] {
        batch_stat_backward_kernel<scalar_t>(xs, layout, mean, grad_mean, grad_var, scale, dx);
      });
  return with_strides_of(dx, x);
}

// ---- grouped statistics --------------------------------------------------------------------
//
// Sample n belongs to group index[n] in [0, G). Each group gets the statistics above over its own
// samples x H x W, with its own shift K_gc (the first value of channel c in the group's first
// sample). Partial sums cover one plane, or a fixed piece of one (NCHW), or a fixed block of one
// sample's rows (channels_last), and are merged per group in sample order in float64: results do
// not depend on the thread count. Non-finite sums of a (group, channel) are recomputed exactly,
// as above. A group without samples gets NaN statistics, loss 0 and coefficients 0.

// The samples of every group, in sample order (a stable counting sort of the index).
struct GroupLayout {
  int64_t G = 0;
  std::vector<int64_t> index;    // (N,) group of each sample
  std::vector<int64_t> order;    // samples sorted by group, stable
  std::vector<int64_t> offsets;  // (G + 1,): group g is order[offsets[g] : offsets[g + 1]]
  int64_t count(int64_t g) const { return offsets[g + 1] - offsets[g]; }
};

GroupLayout group_layout(const at::Tensor& group_index, int64_t G, const char* op) {
  GroupLayout groups;
  groups.G = G;
  const at::Tensor gi = group_index.contiguous();
  const int64_t N = gi.numel();
  const int64_t* p = gi.const_data_ptr<int64_t>();
  groups.index.assign(p, p + N);
  groups.offsets.assign(G + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t g = groups.index[n];
    TORCH_CHECK(g >= 0 && g < G, op, ": group_index[", n, "] = ", g,
                " is out of range: the targets have G = ", G,
                " groups (rows), so a group index must lie in [0, ", G, ")");
    ++groups.offsets[g + 1];
  }
  for (int64_t g = 0; g < G; ++g) groups.offsets[g + 1] += groups.offsets[g];
  groups.order.resize(N);
  std::vector<int64_t> next(groups.offsets.begin(), groups.offsets.end() - 1);
  for (int64_t n = 0; n < N; ++n) groups.order[next[groups.index[n]]++] = n;
  return groups;
}

// Exact float64 mean and biased variance of channel c over the samples of one group.
template <typename scalar_t>
void exact_group_moments(const scalar_t* data, Layout layout, int64_t C, int64_t HW,
                         const int64_t* samples, int64_t count, int64_t c, double& mean,
                         double& var) {
  auto at = [&](int64_t n, int64_t i) {
    return static_cast<double>(layout == Layout::kNCHW ? data[(n * C + c) * HW + i]
                                                       : data[(n * HW + i) * C + c]);
  };
  const double M = static_cast<double>(count * HW);
  double sum = 0.0;
  for (int64_t k = 0; k < count; ++k) {
    for (int64_t i = 0; i < HW; ++i) sum += at(samples[k], i);
  }
  mean = sum / M;
  double squares = 0.0;
  for (int64_t k = 0; k < count; ++k) {
    for (int64_t i = 0; i < HW; ++i) {
      const double d = at(samples[k], i) - mean;
      squares += d * d;
    }
  }
  var = squares / M;
}

// Per-group, per-channel float64 mean and biased variance ((G, C), row-major; NaN for a group
// without samples).
template <typename scalar_t>
void grouped_moments(const at::Tensor& x, Layout layout, const GroupLayout& groups,
                     std::vector<double>& mean, std::vector<double>& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), G = groups.G;
  const scalar_t* data = x.const_data_ptr<scalar_t>();

  // shift[g * C + c]: channel c's first value in group g's first sample (0 if not finite).
  std::vector<acc_t> shift(G * C, acc_t(0));
  for (int64_t g = 0; g < G; ++g) {
    if (groups.count(g) == 0) continue;
    const int64_t first = groups.order[groups.offsets[g]];
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t v =
          layout == Layout::kNCHW ? data[(first * C + c) * HW] : data[first * HW * C + c];
      shift[g * C + c] = shift_of(static_cast<acc_t>(v));
    }
  }

  int64_t pieces = 1;  // partial sums per (sample, channel)
  std::vector<double> part1, part2;
  int64_t stride_n = 0, stride_c = 0, stride_piece = 0;
  if (layout == Layout::kNCHW) {
    // A partial sum per plane, or per piece of kChunkElements of a large plane; [n][c][piece].
    pieces = HW > kChunkElements ? (HW + kChunkElements - 1) / kChunkElements : 1;
    const int64_t piece_len = pieces > 1 ? kChunkElements : HW;
    stride_n = C * pieces, stride_c = pieces, stride_piece = 1;
    part1.assign(N * C * pieces, 0.0);
    part2.assign(N * C * pieces, 0.0);
    const int64_t grain = std::max<int64_t>(1, kGrainElements / piece_len);
    at::parallel_for(0, N * C * pieces, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buffer;
      for (int64_t task = begin; task < end; ++task) {  // memory order: (n, c, piece)
        const int64_t plane = task / pieces, piece = task % pieces;
        const int64_t n = plane / C, c = plane % C;
        const int64_t lo = piece * piece_len, len = std::min(HW, lo + piece_len) - lo;
        double s1 = 0.0, s2 = 0.0;
        shifted_sums(as_acc(data + plane * HW + lo, len, buffer), len,
                     shift[groups.index[n] * C + c], &s1, &s2);
        part1[task] = s1;
        part2[task] = s2;
      }
    });
  } else {
    // A partial sum per block of `rows` rows of one sample, vectorized across channels;
    // [n][piece][c].
    const int64_t rows = std::clamp<int64_t>(kChunkElements * 8 / C, 1, kChunkRowsMax);
    pieces = (HW + rows - 1) / rows;
    stride_n = pieces * C, stride_c = 1, stride_piece = C;
    part1.assign(N * pieces * C, 0.0);
    part2.assign(N * pieces * C, 0.0);
    const int64_t grain = std::max<int64_t>(1, kGrainElements / (std::min(rows, HW) * C));
    at::parallel_for(0, N * pieces, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s1(C), s2(C), buffer;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / pieces, piece = task % pieces;
        const int64_t r0 = n * HW + piece * rows;
        const int64_t n_rows = std::min(n * HW + HW, r0 + rows) - r0;
        std::fill(s1.begin(), s1.end(), acc_t(0));
        std::fill(s2.begin(), s2.end(), acc_t(0));
        const acc_t* p = as_acc(data + r0 * C, n_rows * C, buffer);
        column_shifted_sums(p, n_rows, C, shift.data() + groups.index[n] * C, s1.data(), s2.data());
        for (int64_t c = 0; c < C; ++c) {
          part1[task * C + c] = s1[c];
          part2[task * C + c] = s2[c];
        }
      }
    });
  }

  mean.assign(G * C, std::numeric_limits<double>::quiet_NaN());
  var.assign(G * C, std::numeric_limits<double>::quiet_NaN());
  std::vector<std::pair<int64_t, int64_t>> inexact;  // (group, channel) with non-finite sums
  std::vector<double> s1(C), s2(C);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t count = groups.count(g);
    if (count == 0) continue;
    std::fill(s1.begin(), s1.end(), 0.0);
    std::fill(s2.begin(), s2.end(), 0.0);
    for (int64_t k = groups.offsets[g]; k < groups.offsets[g + 1]; ++k) {
      const int64_t n = groups.order[k];
      for (int64_t piece = 0; piece < pieces; ++piece) {
        const int64_t base = n * stride_n + piece * stride_piece;
        for (int64_t c = 0; c < C; ++c) {
          s1[c] += part1[base + c * stride_c];
          s2[c] += part2[base + c * stride_c];
        }
      }
    }
    const double M = static_cast<double>(count * HW);
    for (int64_t c = 0; c < C; ++c) {
      if (!is_finite(s1[c]) || !is_finite(s2[c])) inexact.emplace_back(g, c);
      const double d = s1[c] / M;
      mean[g * C + c] = static_cast<double>(shift[g * C + c]) + d;
      var[g * C + c] = std::max(s2[c] / M - d * d, 0.0);
    }
  }
  at::parallel_for(0, static_cast<int64_t>(inexact.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto [g, c] = inexact[k];
      exact_group_moments(data, layout, C, HW, groups.order.data() + groups.offsets[g],
                          groups.count(g), c, mean[g * C + c], var[g * C + c]);
    }
  });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_outputs(
    const at::TensorOptions& options, int64_t G, int64_t C, double loss,
    const std::vector<double>& group_loss, const std::vector<double>& mean,
    const std::vector<double>& var, const std::vector<double>& coef) {
  return {to_tensor<T>({loss}, options).reshape({}), to_tensor<T>(group_loss, options),
          to_tensor<T>(mean, options).view({G, C}), to_tensor<T>(var, options).view({G, C}),
          to_tensor<T>(coef, options).view({2, G, C})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stat_loss_grouped_cpu(
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
  const GroupLayout groups = group_layout(group_index, G, op);
  const auto [xs, layout] = supported_layout(x);
  const int64_t C = x.size(1);
  std::vector<double> mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_loss_grouped",
      [&] { grouped_moments<scalar_t>(xs, layout, groups, mean, var); });
  const std::vector<double> tm = to_doubles(target_mean), tv = to_doubles(target_var);
  const std::vector<double> w =
      weight.has_value() ? to_doubles(*weight) : std::vector<double>(G, 1.0);
  const auto options = x.options().dtype(accumulate_type(x.scalar_type()));
  const bool is_double = options.dtype() == at::kDouble;
  std::vector<double> group_loss(G, 0.0), coef(2 * G * C, 0.0);
  std::vector<double> dmean(C), dvar(C);
  double loss = 0.0;
  for (int64_t g = 0; g < G; ++g) {
    if (groups.count(g) == 0) continue;  // no samples: adds nothing
    double ss_mean = 0.0, ss_var = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = g * C + c;
      const double m = is_double ? mean[i] : as_returned<float>(mean[i]);
      const double v = is_double ? var[i] : as_returned<float>(var[i]);
      dmean[c] = m - tm[i];
      dvar[c] = v - tv[i];
      ss_mean += dmean[c] * dmean[c];
      ss_var += dvar[c] * dvar[c];
    }
    const double norm_mean = std::sqrt(ss_mean), norm_var = std::sqrt(ss_var);
    for (int64_t c = 0; c < C; ++c) {
      // 0 only at a zero norm (autograd's subgradient); a NaN norm makes the group's coefficients
      // NaN.
      coef[g * C + c] = norm_mean == 0.0 ? 0.0 : dmean[c] / norm_mean;
      coef[(G + g) * C + c] = norm_var == 0.0 ? 0.0 : dvar[c] / norm_var;
    }
    group_loss[g] = norm_mean + norm_var;
    loss += w[g] * group_loss[g];
  }
  if (is_double) return grouped_outputs<double>(options, G, C, loss, group_loss, mean, var, coef);
  return grouped_outputs<float>(options, G, C, loss, group_loss, mean, var, coef);
}

template <typename scalar_t>
void grouped_backward_kernel(const at::Tensor& x, Layout layout, const GroupLayout& groups,
                             const at::Tensor& mean, const at::Tensor& grad_mean,
                             const at::Tensor& grad_var, const std::vector<double>& scale,
                             at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), G = groups.G;
  // Per group the coefficients of batch_stat_backward_kernel, with M = the group's count * HW.
  std::vector<acc_t> c1(G * C), c2(G * C), mu(G * C);
  const at::Tensor m = mean.contiguous(), gm = grad_mean.contiguous(), gv = grad_var.contiguous();
  const acc_t* pm = m.const_data_ptr<acc_t>();
  const acc_t* pgm = gm.const_data_ptr<acc_t>();
  const acc_t* pgv = gv.const_data_ptr<acc_t>();
  for (int64_t g = 0; g < G; ++g) {
    if (groups.count(g) == 0) continue;
    const double inv_m = 1.0 / static_cast<double>(groups.count(g) * HW);
    const double s = scale.size() == 1 ? scale[0] : scale[g];
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = g * C + c;
      const double scaled_gm =
          static_cast<double>(static_cast<acc_t>(s * static_cast<double>(pgm[i])));
      const double scaled_gv =
          static_cast<double>(static_cast<acc_t>(s * static_cast<double>(pgv[i])));
      c1[i] = static_cast<acc_t>(scaled_gm * inv_m);
      c2[i] = static_cast<acc_t>(2.0 * scaled_gv * inv_m);
      mu[i] = pm[i];
    }
  }
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  auto narrow = [](const std::vector<acc_t>& buffer, scalar_t* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(buffer[i]);
  };
  if (layout == Layout::kNCHW) {
    at::parallel_for(0, N * C, std::max<int64_t>(1, kGrainElements / HW),
                     [&](int64_t b, int64_t e) {
                       std::vector<acc_t> buffer, result;
                       for (int64_t plane = b; plane < e; ++plane) {
                         const int64_t i = groups.index[plane / C] * C + plane % C;
                         const acc_t* src = as_acc(in + plane * HW, HW, buffer);
                         if constexpr (std::is_same_v<scalar_t, acc_t>) {
                           centered_affine<acc_t>(src, out + plane * HW, HW, c1[i], c2[i], mu[i]);
                         } else {
                           result.resize(HW);
                           centered_affine<acc_t>(src, result.data(), HW, c1[i], c2[i], mu[i]);
                           narrow(result, out + plane * HW, HW);
                         }
                       }
                     });
  } else {
    const int64_t rows = std::clamp<int64_t>(kGrainElements / C, 1, HW);
    const int64_t pieces = (HW + rows - 1) / rows;
    at::parallel_for(0, N * pieces, 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> buffer, result;
      for (int64_t task = b; task < e; ++task) {
        const int64_t n = task / pieces, r0 = n * HW + task % pieces * rows;
        const int64_t n_rows = std::min(n * HW + HW, r0 + rows) - r0;
        const int64_t g = groups.index[n];
        const acc_t* src = as_acc(in + r0 * C, n_rows * C, buffer);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          rows_centered_affine(src, out + r0 * C, n_rows, C, c1.data() + g * C, c2.data() + g * C,
                               mu.data() + g * C);
        } else {
          result.resize(n_rows * C);
          rows_centered_affine(src, result.data(), n_rows, C, c1.data() + g * C, c2.data() + g * C,
                               mu.data() + g * C);
          narrow(result, out + r0 * C, n_rows * C);
        }
      }
    });
  }
}

at::Tensor grouped_stat_backward_cpu(const at::Tensor& x, const at::Tensor& group_index,
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
  const GroupLayout groups = group_layout(group_index, G, op);
  const std::vector<double> scale =
      grad_scale.has_value() ? to_doubles(*grad_scale) : std::vector<double>{1.0};
  const auto [xs, layout] = supported_layout(x);
  at::Tensor dx = at::empty_like(xs);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_stat_backward", [&] {
        grouped_backward_kernel<scalar_t>(xs, layout, groups, mean, grad_mean, grad_var, scale, dx);
      });
  return with_strides_of(dx, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(delt_ext, CPU, m) {
  m.impl("batch_mean_var", &batch_mean_var_cpu);
  m.impl("bn_stat_loss", &bn_stat_loss_cpu);
  m.impl("batch_stat_backward", &batch_stat_backward_cpu);
  m.impl("bn_stat_loss_grouped", &bn_stat_loss_grouped_cpu);
  m.impl("grouped_stat_backward", &grouped_stat_backward_cpu);
}

}  // namespace delt_ext
