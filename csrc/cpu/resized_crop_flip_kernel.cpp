// CPU kernels of resized_crop_flip and its backward (semantics: csrc/resized_crop_flip.h).
//
// Tap tables, built per sample (once per call when one params row serves the batch):
//   forward:  for each output row i (column j), its two source rows (columns) in x and weights;
//   backward: for each input row y (column x), the (output index, weight) pairs that read it,
//             i.e. the transposed taps (CSR lists).
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
// Layouts: an NCHW sample is C planes of rows of W values, a channels_last sample one plane of
// rows of W pixels of C values. Both are read and written in place, without copies.

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
// NaN where torchvision (which copies a box of the output size) keeps it. In the loops that must
// vectorize, "skipped" is a bit mask (the term becomes +0) instead of a branch: GCC does not
// if-convert a float select, and with a branch the gathers stay scalar. Pointers are __restrict__
// so that the loops vectorize (AVX2 gathers in the x86-64-v3 clones).
template <typename T>
using BitsOf = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

// h[j*K + k] = w0[j] * src[x0[j]*K + k] + w1[j] * src[x1[j]*K + k], j < out_w, k < K.
template <typename T>
DELT_CPU_CLONES void resample_row(const T* __restrict__ src, int64_t K,
                                  const int32_t* __restrict__ x0, const int32_t* __restrict__ x1,
                                  const T* __restrict__ w0, const T* __restrict__ w1, int64_t out_w,
                                  T* __restrict__ h) {
  if (K == 1) {
    for (int64_t j = 0; j < out_w; ++j) {
      const T second = w1[j] * src[x1[j]];
      BitsOf<T> bits, weight_bits;
      std::memcpy(&bits, &second, sizeof(T));
      std::memcpy(&weight_bits, &w1[j], sizeof(T));
      bits &= BitsOf<T>(0) - BitsOf<T>(weight_bits != 0);  // all ones, or 0 for weight +0
      T kept;
      std::memcpy(&kept, &bits, sizeof(T));
      h[j] = w0[j] * src[x0[j]] + kept;
    }
    return;
  }
  for (int64_t j = 0; j < out_w; ++j) {
    const T* a = src + x0[j] * K;
    const T* b = src + x1[j] * K;
    T* dst = h + j * K;
    const T wa = w0[j], wb = w1[j];
    if (wb == T(0)) {
      for (int64_t k = 0; k < K; ++k) dst[k] = wa * a[k];
    } else {
      for (int64_t k = 0; k < K; ++k) dst[k] = wa * a[k] + wb * b[k];
    }
  }
}

// out[e] = wa * a[e] + wb * b[e]
template <typename T>
DELT_CPU_CLONES void blend_rows(const T* __restrict__ a, const T* __restrict__ b, T wa, T wb,
                                int64_t n, T* __restrict__ out) {
  if (wb == T(0)) {
    for (int64_t e = 0; e < n; ++e) out[e] = wa * a[e];
    return;
  }
  for (int64_t e = 0; e < n; ++e) out[e] = wa * a[e] + wb * b[e];
}

// t[e] = w * g[e]  (first) or  t[e] += w * g[e]
template <typename T>
DELT_CPU_CLONES void scale_row(const T* __restrict__ g, T w, int64_t n, T* __restrict__ t) {
  for (int64_t e = 0; e < n; ++e) t[e] = w * g[e];
}

template <typename T>
DELT_CPU_CLONES void add_scaled_row(const T* __restrict__ g, T w, int64_t n, T* __restrict__ t) {
  for (int64_t e = 0; e < n; ++e) t[e] += w * g[e];
}

// res[x] = sum over m < M of weight[x*M + m] * t[index[x*M + m]], in m order, x < count: the
// transposed horizontal taps of K = 1 rows, padded to M entries per column. A fixed M gives a
// fixed trip count, so the loop over x vectorizes.
template <int M, typename T>
DELT_CPU_CLONES void gather_padded_fixed(const T* __restrict__ t, const int32_t* __restrict__ index,
                                         const T* __restrict__ weight, int64_t count,
                                         T* __restrict__ res) {
  for (int64_t x = 0; x < count; ++x) {
    T sum = 0;
    for (int m = 0; m < M; ++m) sum += weight[x * M + m] * t[index[x * M + m]];
    res[x] = sum;
  }
}

// The same for any M, and for K values per pixel:
// res[x*K + k] = sum over m of weight[x*M + m] * t[index[x*M + m]*K + k].
template <typename T>
DELT_CPU_CLONES void gather_padded(const T* __restrict__ t, int64_t K, int64_t M,
                                   const int32_t* __restrict__ index, const T* __restrict__ weight,
                                   int64_t count, T* __restrict__ res) {
  for (int64_t x = 0; x < count; ++x) {
    T* dst = res + x * K;
    for (int64_t k = 0; k < K; ++k) dst[k] = 0;
    for (int64_t m = 0; m < M; ++m) {
      const T* src = t + index[x * M + m] * K;
      const T w = weight[x * M + m];
      for (int64_t k = 0; k < K; ++k) dst[k] += w * src[k];
    }
  }
}

template <typename T>
void gather_padded_row(const T* t, int64_t K, int64_t M, const int32_t* index, const T* weight,
                       int64_t count, T* res) {
  if (K == 1) {
    switch (M) {
      case 1:
        return gather_padded_fixed<1, T>(t, index, weight, count, res);
      case 2:
        return gather_padded_fixed<2, T>(t, index, weight, count, res);
      case 3:
        return gather_padded_fixed<3, T>(t, index, weight, count, res);
      case 4:
        return gather_padded_fixed<4, T>(t, index, weight, count, res);
      case 5:
        return gather_padded_fixed<5, T>(t, index, weight, count, res);
      case 6:
        return gather_padded_fixed<6, T>(t, index, weight, count, res);
      case 7:
        return gather_padded_fixed<7, T>(t, index, weight, count, res);
      case 8:
        return gather_padded_fixed<8, T>(t, index, weight, count, res);
      default:
        break;
    }
  }
  gather_padded<T>(t, K, M, index, weight, count, res);
}

// ---- tap tables -------------------------------------------------------------------------------

// Taps of one axis of one params row: the forward taps by output index (indices absolute in x)
// and, for the backward, the transposed taps by input index as a CSR list.
template <typename acc_t>
struct AxisTaps {
  std::vector<int32_t> i0, i1;
  std::vector<acc_t> w0, w1;
  std::vector<int32_t> offset;  // input index v reads entries [offset[v], offset[v + 1])
  std::vector<int32_t> reader;  // output index
  std::vector<acc_t> weight;
  std::vector<int32_t> cursor;

  void build(const Axis& a, int64_t in, bool transposed) {
    const int64_t out = a.out;
    i0.resize(out);
    i1.resize(out);
    w0.resize(out);
    w1.resize(out);
    const acc_t scale = crop::axis_scale<acc_t>(a.length, out);
    for (int64_t o = 0; o < out; ++o) {
      const auto t = crop::source_taps<acc_t>(crop::pre_index(a, o), a.length, scale);
      i0[o] = static_cast<int32_t>(a.start + t.i0);
      i1[o] = static_cast<int32_t>(a.start + t.i1);
      w0[o] = t.w0;
      w1[o] = t.w1;
    }
    if (!transposed) return;
    // The transpose, in two passes over the pre-indices p in ascending order (count, then fill).
    // i0 ascends with p, so every list comes out in ascending p: the order in which the CUDA
    // kernel walks crop::readers_of, with the same weights (crop::tap_weight), zeros dropped.
    auto each_tap = [&](auto&& visit) {
      for (int64_t p = 0; p < out; ++p) {
        const int64_t o = crop::output_index(a, p);
        if (i0[o] == i1[o]) {
          visit(i0[o], o, w0[o] + w1[o]);
        } else {
          visit(i0[o], o, w0[o]);
          visit(i1[o], o, w1[o]);
        }
      }
    };
    offset.assign(in + 1, 0);
    each_tap([&](int64_t v, int64_t, acc_t w) {
      if (w != acc_t(0)) ++offset[v + 1];
    });
    for (int64_t v = 0; v < in; ++v) offset[v + 1] += offset[v];
    reader.resize(offset[in]);
    weight.resize(offset[in]);
    cursor.assign(offset.begin(), offset.end() - 1);
    each_tap([&](int64_t v, int64_t o, acc_t w) {
      if (w == acc_t(0)) return;  // e.g. the unused second tap when in == out
      reader[cursor[v]] = static_cast<int32_t>(o);
      weight[cursor[v]] = w;
      ++cursor[v];
    });
  }
};

// The transposed taps of the crop's columns, each list padded with (zero slot, weight 0) entries
// to `width`, the longest list: the gather over columns then has a fixed trip count. The zero
// slot is a column index past the output row (`out`), where the backward keeps zeros.
template <typename acc_t>
struct PaddedTaps {
  int64_t width = 0;
  std::vector<int32_t> reader;
  std::vector<acc_t> weight;

  void build(const AxisTaps<acc_t>& taps, const Axis& a) {
    width = 0;
    for (int64_t v = a.start; v < a.start + a.length; ++v) {
      width = std::max<int64_t>(width, taps.offset[v + 1] - taps.offset[v]);
    }
    reader.assign(a.length * width, static_cast<int32_t>(a.out));
    weight.assign(a.length * width, acc_t(0));
    for (int64_t c = 0; c < a.length; ++c) {
      const int32_t begin = taps.offset[a.start + c], end = taps.offset[a.start + c + 1];
      for (int32_t e = begin; e < end; ++e) {
        reader[c * width + (e - begin)] = taps.reader[e];
        weight[c * width + (e - begin)] = taps.weight[e];
      }
    }
  }
};

template <typename acc_t>
struct RowTaps {
  Axis rows, cols;
  AxisTaps<acc_t> y, x;
  PaddedTaps<acc_t> padded_x;  // backward only

  void build(const double* row, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
             bool transposed) {
    const Box b = crop::decode_box(row, in_h, in_w, out_h, out_w);
    rows = crop::row_axis(b, out_h);
    cols = crop::col_axis(b, out_w);
    y.build(rows, in_h, transposed);
    x.build(cols, in_w, transposed);
    if (transposed) padded_x.build(x, cols);
  }
};

// The taps of each sample: built once before the parallel loop when one params row serves the
// batch, else per sample inside the task that needs them (in parallel, no shared table).
template <typename acc_t>
class SampleTaps {
 public:
  SampleTaps(const at::Tensor& params, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
             bool transposed)
      : params_(params.const_data_ptr<double>()),
        shared_(params.size(0) == 1),
        in_h_(in_h),
        in_w_(in_w),
        out_h_(out_h),
        out_w_(out_w),
        transposed_(transposed) {
    if (shared_) batch_.build(params_, in_h, in_w, out_h, out_w, transposed);
  }

  // Taps of sample n; `local` and `local_row` belong to the calling thread.
  const RowTaps<acc_t>& of(int64_t n, RowTaps<acc_t>& local, int64_t& local_row) const {
    if (shared_) return batch_;
    if (local_row != n) {
      local.build(params_ + n * crop::kParamColumns, in_h_, in_w_, out_h_, out_w_, transposed_);
      local_row = n;
    }
    return local;
  }

 private:
  const double* params_;
  bool shared_;
  int64_t in_h_, in_w_, out_h_, out_w_;
  bool transposed_;
  RowTaps<acc_t> batch_;
};

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

// How a sample is laid out: NCHW is C planes of rows of W values (K = 1); channels_last is one
// plane of rows of W pixels of C values (K = C).
struct SampleLayout {
  int64_t planes, K;
};

SampleLayout sample_layout(int64_t C, Layout layout) {
  return layout == Layout::kChannelsLast ? SampleLayout{1, C} : SampleLayout{C, 1};
}

// Tasks are (sample, block of rows); a task handles its rows in every plane of the sample, so the
// sample's taps are built once per task at most.
struct RowTask {
  int64_t n, row_begin, row_end;  // sample n, its rows [row_begin, row_end)
};

struct Blocks {
  int64_t rows, rows_per_task, per_sample, grain;

  RowTask task(int64_t index) const {
    const int64_t n = index / per_sample, block = index % per_sample;
    const int64_t row_begin = block * rows_per_task;
    return RowTask{n, row_begin, std::min(rows, row_begin + rows_per_task)};
  }
};

Blocks row_blocks(int64_t rows, int64_t row_elements) {
  const int64_t rows_per_task = std::clamp<int64_t>(kGrainElements / row_elements, 1, rows);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (rows_per_task * row_elements));
  return Blocks{rows, rows_per_task, (rows + rows_per_task - 1) / rows_per_task, grain};
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, Layout layout, const at::Tensor& params, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = out.size(2), OW = out.size(3);
  const SampleTaps<acc_t> taps(params, H, W, OH, OW, /*transposed=*/false);
  const auto [planes, K] = sample_layout(C, layout);
  const int64_t in_row = W * K, out_row = OW * K;
  const Blocks blocks = row_blocks(OH, planes * out_row);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* result = out.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, N * blocks.per_sample, blocks.grain, [&](int64_t begin, int64_t end) {
    RowTaps<acc_t> local;
    int64_t local_row = -1;
    std::vector<acc_t> cache(2 * out_row), source, narrow;
    for (int64_t task = begin; task < end; ++task) {
      const auto [n, p_begin, p_end] = blocks.task(task);
      const RowTaps<acc_t>& t = taps.of(n, local, local_row);
      for (int64_t plane = 0; plane < planes; ++plane) {
        const scalar_t* plane_in = in + (n * planes + plane) * H * in_row;
        scalar_t* plane_out = result + (n * planes + plane) * OH * out_row;
        int64_t cached[2] = {-1, -1};  // source row held by each cache slot
        // Slot holding source row y, resampled on a miss into the slot other than `keep`.
        auto fetch = [&](int64_t y, int keep) -> int {
          if (cached[0] == y) return 0;
          if (cached[1] == y) return 1;
          const int slot = keep == 0 ? 1 : 0;
          const acc_t* src = widened<scalar_t, acc_t>(plane_in + y * in_row, in_row, source);
          resample_row<acc_t>(src, K, t.x.i0.data(), t.x.i1.data(), t.x.w0.data(), t.x.w1.data(),
                              OW, cache.data() + slot * out_row);
          cached[slot] = y;
          return slot;
        };
        // Pre-index order: the source rows ascend, so the two-row cache holds what is reused.
        for (int64_t p = p_begin; p < p_end; ++p) {
          const int64_t i = crop::output_index(t.rows, p);
          const int64_t y0 = t.y.i0[i], y1 = t.y.i1[i];
          const int s1_held = cached[0] == y1 ? 0 : (cached[1] == y1 ? 1 : -1);
          const int s0 = fetch(y0, s1_held);
          const int s1 = fetch(y1, s0);
          scalar_t* dst = plane_out + i * out_row;
          acc_t* row = result_row<scalar_t, acc_t>(dst, out_row, narrow);
          blend_rows<acc_t>(cache.data() + s0 * out_row, cache.data() + s1 * out_row, t.y.w0[i],
                            t.y.w1[i], out_row, row);
          store<scalar_t, acc_t>(row, dst, out_row);
        }
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
  const SampleTaps<acc_t> taps(params, H, W, OH, OW, /*transposed=*/true);
  const auto [planes, K] = sample_layout(C, layout);
  const int64_t in_row = W * K, out_row = OW * K;
  const Blocks blocks = row_blocks(H, planes * in_row);
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  scalar_t* result = grad_in.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, N * blocks.per_sample, blocks.grain, [&](int64_t begin, int64_t end) {
    RowTaps<acc_t> local;
    int64_t local_row = -1;
    // One more pixel of zeros at the end: the zero slot that padded taps read (PaddedTaps).
    std::vector<acc_t> column_sums(out_row + K, acc_t(0)), source, narrow;
    for (int64_t task = begin; task < end; ++task) {
      const auto [n, y_begin, y_end] = blocks.task(task);
      const RowTaps<acc_t>& t = taps.of(n, local, local_row);
      for (int64_t plane = 0; plane < planes; ++plane) {
        const scalar_t* plane_g = g + (n * planes + plane) * OH * out_row;
        scalar_t* plane_in = result + (n * planes + plane) * H * in_row;
        for (int64_t y = y_begin; y < y_end; ++y) {
          scalar_t* dst = plane_in + y * in_row;
          const int32_t e_begin = t.y.offset[y], e_end = t.y.offset[y + 1];
          if (e_begin == e_end) {  // no output reads this row (outside the crop)
            // All-zero bits are +0.0 in the four dtypes.
            std::memset(static_cast<void*>(dst), 0, sizeof(scalar_t) * in_row);
            continue;
          }
          // Vertical: column_sums = sum of wy * grad_out[i, :] over the rows i that read y.
          for (int32_t e = e_begin; e < e_end; ++e) {
            const acc_t* src =
                widened<scalar_t, acc_t>(plane_g + t.y.reader[e] * out_row, out_row, source);
            if (e == e_begin) {
              scale_row<acc_t>(src, t.y.weight[e], out_row, column_sums.data());
            } else {
              add_scaled_row<acc_t>(src, t.y.weight[e], out_row, column_sums.data());
            }
          }
          // Horizontal: grad_x[y, x] = sum of wx * column_sums[j] over the columns j that read x,
          // for the crop's columns; 0 left and right of the crop.
          const int64_t left = t.cols.start * K, inside = t.cols.length * K;
          std::memset(static_cast<void*>(dst), 0, sizeof(scalar_t) * left);
          std::memset(static_cast<void*>(dst + left + inside), 0,
                      sizeof(scalar_t) * (in_row - left - inside));
          acc_t* row = result_row<scalar_t, acc_t>(dst + left, inside, narrow);
          gather_padded_row<acc_t>(column_sums.data(), K, t.padded_x.width,
                                   t.padded_x.reader.data(), t.padded_x.weight.data(),
                                   t.cols.length, row);
          store<scalar_t, acc_t>(row, dst + left, inside);
        }
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
  at::Tensor grad_in =
      crop::empty_in_layout({grad_out.size(0), grad_out.size(1), in_h, in_w}, grad_out, layout);
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
