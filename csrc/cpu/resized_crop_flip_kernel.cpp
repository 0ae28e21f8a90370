// CPU kernels of resized_crop_flip and its backward (semantics: csrc/resized_crop_flip.h).
//
// Tap tables, built once per call and params row:
//   forward:  for each output row i (column j), its two source rows (columns) in x and weights;
//   backward: for each input row y (column x), the (output index, weight) pairs that read it:
//             the transposed taps, from the contiguous pre-index range of crop::readers_of.
// Forward, separable: output rows are visited in pre-index order, so their source rows ascend;
// each source row is resampled horizontally once into a two-row cache (an upscaled crop reuses it
// for several output rows), then two cached rows are blended into the output row.
// Backward, the exact transpose, also a gather: for each input row y,
//   t = sum over output rows i that read y of wy * grad_out[i, :]     (contiguous rows)
//   grad_x[y, x] = sum over output columns j that read x of wx * t[j]
// and zeros where nothing reads (outside the crop), in the same pass. No zero-fill + scatter.
// Every element is produced by a fixed sequence of operations, whatever the thread split, so
// both ops are bitwise reproducible.
//
// Layouts: NCHW works plane by plane (a row is W values); channels_last works sample by sample
// (a row is W pixels of C values). Both read and write the tensors in place, without copies.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/vec.h"
#include "resized_crop_flip.h"

namespace delt_ext {
namespace {

using crop::Axis;
using crop::Box;

constexpr int64_t kGrainElements = 16384;  // smallest amount of work given to a thread

// ---- hot loops (raw pointers, multi-versioned) -------------------------------------------------

// A tap of weight 0 is skipped rather than multiplied: 0 * inf would turn an infinite pixel into
// NaN where torchvision (which copies a box of the output size) keeps it.

// h[j*K + k] = w0[j] * src[x0[j]*K + k] + w1[j] * src[x1[j]*K + k], j < out_w, k < K.
template <typename T>
DELT_CPU_CLONES void resample_row(const T* src, int64_t K, const int32_t* x0, const int32_t* x1,
                                  const T* w0, const T* w1, int64_t out_w, T* h) {
  if (K == 1) {
    for (int64_t j = 0; j < out_w; ++j) {
      const T first = w0[j] * src[x0[j]];
      h[j] = w1[j] == T(0) ? first : first + w1[j] * src[x1[j]];
    }
    return;
  }
  for (int64_t j = 0; j < out_w; ++j) {
    const T* a = src + x0[j] * K;
    const T* b = src + x1[j] * K;
    T* dst = h + j * K;
    if (w1[j] == T(0)) {
      for (int64_t k = 0; k < K; ++k) dst[k] = w0[j] * a[k];
    } else {
      for (int64_t k = 0; k < K; ++k) dst[k] = w0[j] * a[k] + w1[j] * b[k];
    }
  }
}

// out[e] = wa * a[e] + wb * b[e]
template <typename T>
DELT_CPU_CLONES void blend_rows(const T* a, const T* b, T wa, T wb, int64_t n, T* out) {
  if (wb == T(0)) {
    for (int64_t e = 0; e < n; ++e) out[e] = wa * a[e];
    return;
  }
  for (int64_t e = 0; e < n; ++e) out[e] = wa * a[e] + wb * b[e];
}

// t[e] = w * g[e]  (first) or  t[e] += w * g[e]
template <typename T>
DELT_CPU_CLONES void scale_row(const T* g, T w, int64_t n, T* t) {
  for (int64_t e = 0; e < n; ++e) t[e] = w * g[e];
}

template <typename T>
DELT_CPU_CLONES void add_scaled_row(const T* g, T w, int64_t n, T* t) {
  for (int64_t e = 0; e < n; ++e) t[e] += w * g[e];
}

// res[x*K + k] = sum over e in [offset[x], offset[x+1]) of weight[e] * t[index[e]*K + k], in e
// order; 0 for an empty list. x < in_w, k < K.
template <typename T>
DELT_CPU_CLONES void gather_transposed_row(const T* t, int64_t K, const int64_t* offset,
                                           const int32_t* index, const T* weight, int64_t in_w,
                                           T* res) {
  if (K == 1) {
    for (int64_t x = 0; x < in_w; ++x) {
      T sum = 0;
      for (int64_t e = offset[x]; e < offset[x + 1]; ++e) sum += weight[e] * t[index[e]];
      res[x] = sum;
    }
    return;
  }
  for (int64_t x = 0; x < in_w; ++x) {
    T* dst = res + x * K;
    for (int64_t k = 0; k < K; ++k) dst[k] = 0;
    for (int64_t e = offset[x]; e < offset[x + 1]; ++e) {
      const T* src = t + index[e] * K;
      const T w = weight[e];
      for (int64_t k = 0; k < K; ++k) dst[k] += w * src[k];
    }
  }
}

// ---- tap tables -------------------------------------------------------------------------------

// One axis, for every params row r: forward taps by output index (entry r * out + o, indices
// absolute in x) and, optionally, the transposed taps by input index as a CSR list (row r's
// entries live in [r * 2 * out, (r + 1) * 2 * out): each pre-index reads at most 2 inputs).
template <typename acc_t>
struct AxisTables {
  int64_t in = 0, out = 0;
  std::vector<int32_t> i0, i1;
  std::vector<acc_t> w0, w1;
  std::vector<int64_t> offset;  // r * (in + 1) + v
  std::vector<int32_t> reader;  // output index
  std::vector<acc_t> weight;

  void allocate(int64_t rows, int64_t in_size, int64_t out_size, bool transposed) {
    in = in_size;
    out = out_size;
    i0.resize(rows * out);
    i1.resize(rows * out);
    w0.resize(rows * out);
    w1.resize(rows * out);
    if (transposed) {
      offset.resize(rows * (in + 1));
      reader.resize(rows * 2 * out);
      weight.resize(rows * 2 * out);
    }
  }

  void fill(int64_t r, const Axis& a, bool transposed) {
    const int64_t base = r * out;
    for (int64_t o = 0; o < out; ++o) {
      const auto t = crop::source_taps<acc_t>(crop::pre_index(a, o), a.length, out);
      i0[base + o] = static_cast<int32_t>(a.start + t.i0);
      i1[base + o] = static_cast<int32_t>(a.start + t.i1);
      w0[base + o] = t.w0;
      w1[base + o] = t.w1;
    }
    if (!transposed) return;
    // readers_of(c) = [first p with i0(p) >= c - 1, first p with i0(p) >= c + 1): two monotone
    // pointers over the i0 values above replace its binary searches (same values, same result).
    auto crop_i0 = [&](int64_t p) { return i0[base + crop::output_index(a, p)] - a.start; };
    int64_t* off = offset.data() + r * (in + 1);
    int64_t n = r * 2 * out;
    int64_t begin = 0, end = 0;
    for (int64_t v = 0; v < in; ++v) {
      off[v] = n;
      const int64_t c = v - a.start;
      if (c < 0 || c >= a.length) continue;
      while (begin < out && crop_i0(begin) < c - 1) ++begin;
      while (end < out && crop_i0(end) < c + 1) ++end;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t o = crop::output_index(a, p);
        const acc_t w = crop::tap_weight<acc_t>(i0[base + o], i1[base + o], w0[base + o],
                                                w1[base + o], v);
        if (w == acc_t(0)) continue;  // e.g. the unused second tap when in == out
        reader[n] = static_cast<int32_t>(o);
        weight[n] = w;
        ++n;
      }
    }
    off[in] = n;
  }
};

template <typename acc_t>
struct Tables {
  int64_t rows = 0;
  AxisTables<acc_t> y, x;
};

template <typename acc_t>
Tables<acc_t> build_tables(const at::Tensor& params, int64_t in_h, int64_t in_w, int64_t out_h,
                           int64_t out_w, bool transposed) {
  Tables<acc_t> t;
  t.rows = params.size(0);
  t.y.allocate(t.rows, in_h, out_h, transposed);
  t.x.allocate(t.rows, in_w, out_w, transposed);
  const double* p = params.const_data_ptr<double>();
  const int64_t work = (out_h + out_w + (transposed ? in_h + in_w : 0)) * 8;
  at::parallel_for(0, t.rows, std::max<int64_t>(1, kGrainElements / work),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const Box b = crop::decode_box(p + r * crop::kParamColumns, in_h, in_w,
                                                      out_h, out_w);
                       t.y.fill(r, crop::row_axis(b, out_h), transposed);
                       t.x.fill(r, crop::col_axis(b, out_w), transposed);
                     }
                   });
  return t;
}

// 16-bit values are widened to float (and results narrowed) through row buffers, so every dtype
// runs the float/double loops above.
template <typename scalar_t, typename acc_t>
inline const acc_t* widened(const scalar_t* p, int64_t n, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return p;
  } else {
    buffer.resize(n);
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<acc_t>(p[i]);
    return buffer.data();
  }
}

// Where a row result in accumulate type is computed: straight into the output for float32 and
// float64, else into `buffer`, narrowed by store().
template <typename scalar_t, typename acc_t>
inline acc_t* result_row(scalar_t* dst, int64_t n, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst;
  } else {
    buffer.resize(n);
    return buffer.data();
  }
}

template <typename scalar_t, typename acc_t>
inline void store(const acc_t* row, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(row[i]);
  }
}

// Work units: NCHW planes (K = 1) or channels_last samples (K = C values per pixel).
struct Units {
  int64_t count, K, channels;
  bool channels_last;
  int64_t sample(int64_t u) const { return channels_last ? u : u / channels; }
};

Units units_of(int64_t N, int64_t C, Layout layout) {
  const bool cl = layout == Layout::kChannelsLast;
  return Units{cl ? N : N * C, cl ? C : 1, C, cl};
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, Layout layout, const at::Tensor& params, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = out.size(2), OW = out.size(3);
  const Tables<acc_t> tables = build_tables<acc_t>(params, H, W, OH, OW, /*transposed=*/false);
  const Units units = units_of(N, C, layout);
  const int64_t K = units.K, in_row = W * K, out_row = OW * K;
  const int64_t rows_per_task = std::clamp<int64_t>(kGrainElements / out_row, 1, OH);
  const int64_t blocks = (OH + rows_per_task - 1) / rows_per_task;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (rows_per_task * out_row));
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* result = out.mutable_data_ptr<scalar_t>();
  const auto& ty = tables.y;
  const auto& tx = tables.x;

  at::parallel_for(0, units.count * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> cache(2 * out_row), source, narrow;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = task / blocks, block = task % blocks;
      const int64_t r = tables.rows == 1 ? 0 : units.sample(u);
      const scalar_t* unit_in = in + u * H * in_row;
      scalar_t* unit_out = result + u * OH * out_row;
      const Box b = crop::decode_box(params.const_data_ptr<double>() + r * crop::kParamColumns,
                                     H, W, OH, OW);
      const Axis rows = crop::row_axis(b, OH);
      const int32_t* x0 = tx.i0.data() + r * OW;
      const int32_t* x1 = tx.i1.data() + r * OW;
      const acc_t* wx0 = tx.w0.data() + r * OW;
      const acc_t* wx1 = tx.w1.data() + r * OW;
      int64_t cached[2] = {-1, -1};  // source row held by each cache slot
      // Slot holding source row y, resampled on a miss into the slot other than `keep`.
      auto fetch = [&](int64_t y, int keep) -> int {
        if (cached[0] == y) return 0;
        if (cached[1] == y) return 1;
        const int slot = keep == 0 ? 1 : 0;
        const acc_t* src = widened<scalar_t, acc_t>(unit_in + y * in_row, in_row, source);
        resample_row<acc_t>(src, K, x0, x1, wx0, wx1, OW, cache.data() + slot * out_row);
        cached[slot] = y;
        return slot;
      };
      const int64_t p_end = std::min(OH, (block + 1) * rows_per_task);
      for (int64_t p = block * rows_per_task; p < p_end; ++p) {
        const int64_t i = crop::output_index(rows, p);
        const int64_t e = r * OH + i;
        const int64_t y0 = ty.i0[e], y1 = ty.i1[e];
        const int s1_held = cached[0] == y1 ? 0 : (cached[1] == y1 ? 1 : -1);
        const int s0 = fetch(y0, s1_held);
        const int s1 = fetch(y1, s0);
        scalar_t* dst = unit_out + i * out_row;
        acc_t* row = result_row<scalar_t, acc_t>(dst, out_row, narrow);
        blend_rows<acc_t>(cache.data() + s0 * out_row, cache.data() + s1 * out_row, ty.w0[e],
                          ty.w1[e], out_row, row);
        store<scalar_t, acc_t>(row, dst, out_row);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, Layout layout, const at::Tensor& params,
                     at::Tensor& grad_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = grad_out.size(0), C = grad_out.size(1);
  const int64_t OH = grad_out.size(2), OW = grad_out.size(3);
  const int64_t H = grad_in.size(2), W = grad_in.size(3);
  const Tables<acc_t> tables = build_tables<acc_t>(params, H, W, OH, OW, /*transposed=*/true);
  const Units units = units_of(N, C, layout);
  const int64_t K = units.K, in_row = W * K, out_row = OW * K;
  const int64_t rows_per_task = std::clamp<int64_t>(kGrainElements / in_row, 1, H);
  const int64_t blocks = (H + rows_per_task - 1) / rows_per_task;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (rows_per_task * in_row));
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  scalar_t* result = grad_in.mutable_data_ptr<scalar_t>();
  const auto& ty = tables.y;
  const auto& tx = tables.x;

  at::parallel_for(0, units.count * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> t(out_row), source, narrow;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = task / blocks, block = task % blocks;
      const int64_t r = tables.rows == 1 ? 0 : units.sample(u);
      const scalar_t* unit_g = g + u * OH * out_row;
      scalar_t* unit_in = result + u * H * in_row;
      const int64_t* row_offset = ty.offset.data() + r * (H + 1);
      const int64_t* col_offset = tx.offset.data() + r * (W + 1);
      const int64_t y_end = std::min(H, (block + 1) * rows_per_task);
      for (int64_t y = block * rows_per_task; y < y_end; ++y) {
        scalar_t* dst = unit_in + y * in_row;
        const int64_t e_begin = row_offset[y], e_end = row_offset[y + 1];
        if (e_begin == e_end) {  // no output reads this row (outside the crop)
          std::memset(static_cast<void*>(dst), 0, sizeof(scalar_t) * in_row);  // +0.0 in all four dtypes
          continue;
        }
        for (int64_t e = e_begin; e < e_end; ++e) {
          const acc_t* src =
              widened<scalar_t, acc_t>(unit_g + ty.reader[e] * out_row, out_row, source);
          if (e == e_begin) {
            scale_row<acc_t>(src, ty.weight[e], out_row, t.data());
          } else {
            add_scaled_row<acc_t>(src, ty.weight[e], out_row, t.data());
          }
        }
        acc_t* row = result_row<scalar_t, acc_t>(dst, in_row, narrow);
        gather_transposed_row<acc_t>(t.data(), K, col_offset, tx.reader.data(), tx.weight.data(),
                                     W, row);
        store<scalar_t, acc_t>(row, dst, in_row);
      }
    }
  });
}

at::Tensor resized_crop_flip_cpu(const at::Tensor& x, const at::Tensor& params, int64_t out_h,
                                 int64_t out_w) {
  const char* op = "delt_ext::resized_crop_flip";
  crop::check_image(x, "x", op);
  crop::check_size(out_h, out_w, "(out_h, out_w)", op);
  crop::check_params(params, x, op);
  const at::Tensor p = params.to(at::kDouble).contiguous();
  crop::check_param_values(p, x.size(2), x.size(3), op);
  const auto [xs, layout] = supported_layout(x);
  at::Tensor out = crop::empty_in_layout({x.size(0), x.size(1), out_h, out_w}, x, layout);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resized_crop_flip",
                                  [&] { forward_kernel<scalar_t>(xs, layout, p, out); });
  return out;
}

at::Tensor resized_crop_flip_backward_cpu(const at::Tensor& grad_out, const at::Tensor& params,
                                          int64_t in_h, int64_t in_w) {
  const char* op = "delt_ext::resized_crop_flip_backward";
  crop::check_image(grad_out, "grad_out", op);
  crop::check_size(in_h, in_w, "(in_h, in_w)", op);
  crop::check_params(params, grad_out, op);
  const at::Tensor p = params.to(at::kDouble).contiguous();
  crop::check_param_values(p, in_h, in_w, op);
  const auto [gs, layout] = supported_layout(grad_out);
  at::Tensor grad_in = crop::empty_in_layout({grad_out.size(0), grad_out.size(1), in_h, in_w},
                                       grad_out, layout);
  if (grad_in.numel() == 0) return grad_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "resized_crop_flip_backward",
                                  [&] { backward_kernel<scalar_t>(gs, layout, p, grad_in); });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(delt_ext, CPU, m) {
  m.impl("resized_crop_flip", &resized_crop_flip_cpu);
  m.impl("resized_crop_flip_backward", &resized_crop_flip_backward_cpu);
}

}  // namespace delt_ext
