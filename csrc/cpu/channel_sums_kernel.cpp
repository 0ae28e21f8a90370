// CPU kernel of image_channel_sums (schema and summation order in csrc/channel_sums.cpp).
//
// x is read once in its own dtype: float32 and float64 values are widened to float64 in
// registers (four at a time), 16-bit values through a float32 buffer (exact). Each (n, c) sum is
// computed by one task in the documented order (pixel i to partial i % 32, then the tree of
// fold_lanes), so the results are bitwise independent of the thread count and of the layout,
// and the same as the CUDA kernels' for float32, float16 and bfloat16 inputs (their squares are
// exact in float64; a float64 square is rounded, and nvcc may fuse it into the addition).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bn_stat.h"
#include "channel_sums.h"
#include "cpu/vec.h"

namespace delt_ext {
namespace {

constexpr int64_t kGrainValues = 32768;  // smallest amount of work given to a thread

using cpu::f64x4;
using cpu::load_unaligned;
using cpu::store_unaligned;
typedef float f32x4 __attribute__((vector_size(16)));

// Four consecutive values as float64.
template <typename T>
inline f64x4 load4(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return __builtin_convertvector(load_unaligned<f32x4>(p), f64x4);
  } else {
    return load_unaligned<f64x4>(p);
  }
}

// ---- hot loops (raw pointers, multi-versioned; T is float or double) ---------------------------

// The sum and the sum of squares of n contiguous values (one plane), in the documented order:
// lane vector v holds partials 4v .. 4v + 3.
template <typename T>
DELT_CPU_CLONES void plane_sums(const T* p, int64_t n, double* sum, double* sq) {
  constexpr int kVectors = kSumLanes / 4;
  f64x4 s[kVectors] = {}, q[kVectors] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int v = 0; v < kVectors; ++v) {
      const f64x4 d = load4(p + i + 4 * v);
      s[v] += d;
      q[v] += d * d;
    }
  }
  double a[kSumLanes], b[kSumLanes];
  for (int v = 0; v < kVectors; ++v) {
    for (int j = 0; j < 4; ++j) {
      a[4 * v + j] = s[v][j];
      b[4 * v + j] = q[v][j];
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const double d = static_cast<double>(p[i]);
    a[l] += d;
    b[l] += d * d;
  }
  for (int k = kSumLanes / 2; k > 0; k /= 2) {
    for (int l = 0; l < k; ++l) {
      a[l] += a[l + k];
      b[l] += b[l + k];
    }
  }
  *sum = a[0];
  *sq = b[0];
}

// Adds the C values of one row (one pixel of a channels_last image) and their squares to the
// partials s[c], q[c].
template <typename T>
DELT_CPU_CLONES void add_row(const T* row, int64_t C, double* s, double* q) {
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const f64x4 d = load4(row + c);
    store_unaligned(s + c, load_unaligned<f64x4>(s + c) + d);
    store_unaligned(q + c, load_unaligned<f64x4>(q + c) + d * d);
  }
  for (; c < C; ++c) {
    const double d = static_cast<double>(row[c]);
    s[c] += d;
    q[c] += d * d;
  }
}

// 16-bit values widened to float (exact), so they run the float loops.
template <typename scalar_t>
inline auto widened(const scalar_t* p, int64_t n, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    return p;
  } else {
    buffer.resize(n);
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(p[i]);
    return static_cast<const float*>(buffer.data());
  }
}

template <typename scalar_t>
void image_channel_sums_impl(const at::Tensor& x, Layout layout, double* sum, double* sq) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  if (layout == Layout::kNCHW) {
    const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(HW, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer;
      for (int64_t plane = begin; plane < end; ++plane) {
        plane_sums(widened(data + plane * HW, HW, buffer), HW, sum + plane, sq + plane);
      }
    });
    return;
  }
  // channels_last: image n is an (HW, C) row-major block; row r goes to partials r % 32.
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(HW * C, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer;
    std::vector<double> s(kSumLanes * C), q(kSumLanes * C);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(s.begin(), s.end(), 0.0);
      std::fill(q.begin(), q.end(), 0.0);
      for (int64_t r = 0; r < HW; ++r) {
        const int64_t lane = r % kSumLanes;
        add_row(widened(data + (n * HW + r) * C, C, buffer), C, s.data() + lane * C,
                q.data() + lane * C);
      }
      for (int64_t c = 0; c < C; ++c) {
        sum[n * C + c] = fold_lanes(s.data() + c, C);
        sq[n * C + c] = fold_lanes(q.data() + c, C);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> image_channel_sums_cpu(const at::Tensor& x) {
  check_sums_input(x, "delt_ext::image_channel_sums");
  const auto options = x.options().dtype(at::kDouble);
  at::Tensor sum = at::zeros({x.size(0), x.size(1)}, options);
  at::Tensor sq = at::zeros({x.size(0), x.size(1)}, options);
  if (x.numel() == 0) return {sum, sq};
  const auto [xs, layout] = supported_layout(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "image_channel_sums", [&] {
        image_channel_sums_impl<scalar_t>(xs, layout, sum.mutable_data_ptr<double>(),
                                          sq.mutable_data_ptr<double>());
      });
  return {sum, sq};
}

}  // namespace

TORCH_LIBRARY_IMPL(delt_ext, CPU, m) { m.impl("image_channel_sums", &image_channel_sums_cpu); }

}  // namespace delt_ext
