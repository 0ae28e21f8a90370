// CUDA kernels of resized_crop_flip and its backward, and their launch logic (semantics:
// csrc/resized_crop_flip.h; CPU twin: csrc/cpu/resized_crop_flip_kernel.cpp). nvcc compiles this
// header into the extension (csrc/cuda/resized_crop_flip_kernel.cu registers the entry points);
// the tests compile it with the host emulation of tests/cuda_emulation/.
//
// Three launches per op, all gathers, no atomics, no host sync (params stay on the device):
//   1. build_tables: per params row, one thread per entry: the taps (source indices in x and
//      weights) of every output row and column, and for the backward the range of pre-indices
//      that read every input row and column (crop::readers_of), plus the row's roll and flip.
//      Every later kernel reads these, so forward and backward use the very same taps.
//   2. forward: one thread per output element: two rows x two columns of x, bilinear blend.
//   3. backward: one thread per input element: sum over the output columns j and rows i that
//      read it of wx * (wy * grad_out[i, j]), in a fixed order; 0 where nothing reads it (outside
//      the crop), so no zero-fill pass. Bitwise reproducible run to run.
// The element kernels walk their tensor in memory order (NCHW or channels_last), so stores and
// most loads are coalesced.
//
// Params are value-checked on the device by build_tables with the CPU op's rules
// (crop::params_row_valid): a bad row is a device-side assertion, reported by the next
// synchronizing CUDA call, never a silently clamped crop, and no host copy of params is needed.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cuda/compat.cuh"
#include "resized_crop_flip.h"

namespace delt_ext {
namespace crop_cuda {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // more work is covered by grid-stride loops

// The grid-size cap; the emulation tests lower it to exercise the grid-stride loops.
inline int64_t& max_blocks() {
  static int64_t limit = kMaxBlocks;
  return limit;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned blocks_for(int64_t work) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(work, kThreads), 1, max_blocks()));
}

// Sizes of the tables of one params row. int32 part: meta {shift_y, shift_x, flip, 0}, then
// taps {i0, i1} of output rows (entries 0..out_h-1) and columns (out_h..out_h+out_w-1), then
// readers {begin, end} of input rows (0..in_h-1) and columns (in_h..in_h+in_w-1). Weight part:
// {w0, w1} per tap entry.
struct TableShape {
  int64_t in_h, in_w, out_h, out_w;
  __host__ __device__ int64_t taps() const { return out_h + out_w; }
  __host__ __device__ int64_t readers() const { return in_h + in_w; }
  __host__ __device__ int64_t ints_per_row() const { return 4 + 2 * (taps() + readers()); }
};

constexpr int kMeta = 4;

// The grid-stride loops: this thread's first index, and the step (the threads in the grid).
template <typename index_t>
__device__ __forceinline__ index_t first_index() {
  return static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

template <typename index_t>
__device__ __forceinline__ index_t grid_threads() {
  return static_cast<index_t>(gridDim.x) * blockDim.x;
}

// Where element `o` of an N x C x height x width tensor lies when the tensor is walked in memory
// order (NCHW, or channels_last with C innermost): sample n, channel c, row y, column x.
template <typename index_t>
struct Element {
  index_t n, c, y, x;
};

template <bool kChannelsLast, typename index_t>
__device__ __forceinline__ Element<index_t> element_at(index_t o, index_t C, index_t height,
                                                       index_t width) {
  Element<index_t> e;
  index_t rest;
  if constexpr (kChannelsLast) {
    e.c = o % C;
    rest = o / C;
    e.x = rest % width;
    rest /= width;
    e.y = rest % height;
    e.n = rest / height;
  } else {
    e.x = o % width;
    rest = o / width;
    e.y = rest % height;
    rest /= height;
    e.c = rest % C;
    e.n = rest / C;
  }
  return e;
}

// The tables of one params row, as build_tables writes them.
template <typename acc_t>
struct TableRow {
  const int32_t* meta;     // {shift_y, shift_x, flip, 0}
  const int32_t* taps;     // {i0, i1} per tap entry: output rows, then output columns
  const int32_t* readers;  // {begin, end} per input row, then input column (backward only)
  const acc_t* w;          // {w0, w1} per tap entry
};

// The table sizes in an element kernel's index type, and the params row that sample n reads
// (row 0 for every sample when one row is broadcast).
template <typename acc_t, typename index_t>
struct ElementTables {
  const int32_t* ints;
  const acc_t* weights;
  index_t H, W, OH, OW, ints_per_row, taps_per_row;

  __device__ ElementTables(const int32_t* ints_, const acc_t* weights_, const TableShape& s)
      : ints(ints_),
        weights(weights_),
        H(static_cast<index_t>(s.in_h)),
        W(static_cast<index_t>(s.in_w)),
        OH(static_cast<index_t>(s.out_h)),
        OW(static_cast<index_t>(s.out_w)),
        ints_per_row(static_cast<index_t>(s.ints_per_row())),
        taps_per_row(static_cast<index_t>(s.taps())) {}

  __device__ TableRow<acc_t> row(index_t n, bool broadcast) const {
    const index_t r = broadcast ? 0 : n;
    const int32_t* meta = ints + r * ints_per_row;
    return TableRow<acc_t>{meta, meta + kMeta, meta + kMeta + 2 * taps_per_row,
                           weights + r * taps_per_row * 2};
  }
};

template <typename param_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    build_tables(const param_t* __restrict__ params, int64_t rows, TableShape s, bool with_readers,
                 int32_t* __restrict__ ints, acc_t* __restrict__ weights) {
  const int64_t entries = s.taps() + (with_readers ? s.readers() : 0);
  const int64_t total = rows * entries;
  for (int64_t idx = first_index<int64_t>(); idx < total; idx += grid_threads<int64_t>()) {
    const int64_t r = idx / entries, e = idx - r * entries;
    const crop::Box b =
        crop::decode_box(params + r * crop::kParamColumns, s.in_h, s.in_w, s.out_h, s.out_w);
    int32_t* row_ints = ints + r * s.ints_per_row();
    if (e == 0) {
      DELT_DEVICE_CHECK(crop::params_row_valid(params + r * crop::kParamColumns, s.in_h, s.in_w),
                        "delt_ext::resized_crop_flip: a params row is invalid (each value must be "
                        "a finite integer, the box (top, left, height, width) inside the image "
                        "with height, width >= 1, flip 0 or 1)");
      row_ints[0] = static_cast<int32_t>(b.shift_y);
      row_ints[1] = static_cast<int32_t>(b.shift_x);
      row_ints[2] = b.flip ? 1 : 0;
      row_ints[3] = 0;
    }
    if (e < s.taps()) {
      const bool is_row = e < s.out_h;
      const crop::Axis a = is_row ? crop::row_axis(b, s.out_h) : crop::col_axis(b, s.out_w);
      const int64_t o = is_row ? e : e - s.out_h;
      const crop::Taps<acc_t> t = crop::source_taps<acc_t>(
          crop::pre_index(a, o), a.length, crop::axis_scale<acc_t>(a.length, a.out));
      row_ints[kMeta + 2 * e] = static_cast<int32_t>(a.start + t.i0);
      row_ints[kMeta + 2 * e + 1] = static_cast<int32_t>(a.start + t.i1);
      weights[(r * s.taps() + e) * 2] = t.w0;
      weights[(r * s.taps() + e) * 2 + 1] = t.w1;
    } else {
      const int64_t k = e - s.taps();
      const bool is_row = k < s.in_h;
      const crop::Axis a = is_row ? crop::row_axis(b, s.out_h) : crop::col_axis(b, s.out_w);
      const int64_t c = (is_row ? k : k - s.in_h) - a.start;  // index in the crop
      int64_t begin = 0, end = 0;
      if (c >= 0 && c < a.length) {
        crop::readers_of<acc_t>(c, a.length, a.out, crop::axis_scale<acc_t>(a.length, a.out), begin,
                                end);
      }
      int32_t* range = row_ints + kMeta + 2 * s.taps() + 2 * k;
      range[0] = static_cast<int32_t>(begin);
      range[1] = static_cast<int32_t>(end);
    }
  }
}

template <typename scalar_t, typename acc_t, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                   const int32_t* __restrict__ ints, const acc_t* __restrict__ weights,
                   TableShape s, index_t total, index_t C, bool broadcast) {
  const ElementTables<acc_t, index_t> tables(ints, weights, s);
  const index_t H = tables.H, W = tables.W, OH = tables.OH, OW = tables.OW;
  // Distance between horizontally / vertically adjacent pixels of one channel.
  const index_t step_x = kChannelsLast ? C : 1;
  const index_t step_y = W * step_x;
  for (index_t o = first_index<index_t>(); o < total; o += grid_threads<index_t>()) {
    const Element<index_t> e = element_at<kChannelsLast>(o, C, OH, OW);
    const index_t n = e.n, c = e.c, i = e.y, j = e.x;
    const TableRow<acc_t> row = tables.row(n, broadcast);
    const int32_t* taps = row.taps;
    const acc_t* w = row.w;
    const index_t col = OH + j;
    const index_t y0 = taps[2 * i], y1 = taps[2 * i + 1];
    const index_t x0 = taps[2 * col], x1 = taps[2 * col + 1];
    const scalar_t* image = kChannelsLast ? x + n * H * W * C + c : x + (n * C + c) * H * W;
    const scalar_t* row0 = image + y0 * step_y;
    const scalar_t* row1 = image + y1 * step_y;
    // Horizontal first, then vertical: the CPU kernel's order. A tap of weight 0 is skipped, not
    // multiplied (0 * inf = NaN), as on the CPU.
    const acc_t wx0 = w[2 * col], wx1 = w[2 * col + 1];
    const acc_t wy0 = w[2 * i], wy1 = w[2 * i + 1];
    acc_t h0 = wx0 * static_cast<acc_t>(row0[x0 * step_x]);
    acc_t h1 = wx0 * static_cast<acc_t>(row1[x0 * step_x]);
    if (wx1 != acc_t(0)) {
      h0 += wx1 * static_cast<acc_t>(row0[x1 * step_x]);
      h1 += wx1 * static_cast<acc_t>(row1[x1 * step_x]);
    }
    acc_t value = wy0 * h0;
    if (wy1 != acc_t(0)) value += wy1 * h1;
    out[o] = static_cast<scalar_t>(value);
  }
}

template <typename scalar_t, typename acc_t, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_in,
                    const int32_t* __restrict__ ints, const acc_t* __restrict__ weights,
                    TableShape s, index_t total, index_t C, bool broadcast) {
  const ElementTables<acc_t, index_t> tables(ints, weights, s);
  const index_t H = tables.H, W = tables.W, OH = tables.OH, OW = tables.OW;
  const index_t step_x = kChannelsLast ? C : 1;  // in grad_out
  const index_t step_y = OW * step_x;
  for (index_t o = first_index<index_t>(); o < total; o += grid_threads<index_t>()) {
    const Element<index_t> e = element_at<kChannelsLast>(o, C, H, W);
    const index_t n = e.n, c = e.c, y = e.y, x = e.x;
    const TableRow<acc_t> row = tables.row(n, broadcast);
    const int32_t* meta = row.meta;
    const int32_t* taps = row.taps;
    const int32_t* readers = row.readers;
    const acc_t* w = row.w;
    const int32_t p_begin = readers[2 * y], p_end = readers[2 * y + 1];
    const int32_t q_begin = readers[2 * (H + x)], q_end = readers[2 * (H + x) + 1];
    // Only output index mapping is used from these (start and length are not needed).
    const crop::Axis rows{0, 0, s.out_h, meta[0], false};
    const crop::Axis cols{0, 0, s.out_w, meta[1], meta[2] != 0};
    const scalar_t* image =
        kChannelsLast ? grad_out + n * OH * OW * C + c : grad_out + (n * C + c) * OH * OW;
    acc_t sum = 0;
    for (int32_t q = q_begin; q < q_end; ++q) {
      const index_t j = static_cast<index_t>(crop::output_index(cols, q));
      const index_t e = OH + j;
      const acc_t wx = crop::tap_weight<acc_t>(taps[2 * e], taps[2 * e + 1], w[2 * e], w[2 * e + 1],
                                               static_cast<int64_t>(x));
      if (wx == acc_t(0)) continue;  // as the CPU kernel, which drops zero weights
      acc_t column = 0;
      for (int32_t p = p_begin; p < p_end; ++p) {
        const index_t i = static_cast<index_t>(crop::output_index(rows, p));
        const acc_t wy = crop::tap_weight<acc_t>(taps[2 * i], taps[2 * i + 1], w[2 * i],
                                                 w[2 * i + 1], static_cast<int64_t>(y));
        if (wy == acc_t(0)) continue;
        column += wy * static_cast<acc_t>(image[i * step_y + j * step_x]);
      }
      sum += wx * column;
    }
    grad_in[o] = static_cast<scalar_t>(sum);
  }
}

struct DeviceTables {
  at::Tensor ints, weights;
};

inline DeviceTables make_tables(const at::Tensor& params, const TableShape& s, at::ScalarType acc,
                                bool with_readers, cudaStream_t stream) {
  const int64_t rows = params.size(0);
  DeviceTables t;
  t.ints = at::empty({rows, s.ints_per_row()}, params.options().dtype(at::kInt));
  t.weights = at::empty({rows, s.taps() * 2}, params.options().dtype(acc));
  const int64_t work = rows * (s.taps() + (with_readers ? s.readers() : 0));
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "resized_crop_flip_tables", [&] {
    using param_t = scalar_t;
    const param_t* p = params.const_data_ptr<param_t>();
    auto run = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      auto kernel = build_tables<param_t, acc_t>;
      DELT_LAUNCH(kernel, blocks_for(std::max<int64_t>(work, 1)), kThreads, 0, stream, p, rows, s,
                  with_readers, t.ints.mutable_data_ptr<int32_t>(),
                  t.weights.mutable_data_ptr<acc_t>());
    };
    if (acc == at::kDouble) {
      run(double{0});
    } else {
      run(float{0});
    }
  });
  return t;
}

// Launches an element kernel (forward or backward) over `out`, with 32-bit indexing when both
// tensors and the tables allow it.
template <bool kForward>
inline void launch_elements(const at::Tensor& in, Layout layout, const DeviceTables& tables,
                            const TableShape& s, bool broadcast, at::Tensor& out,
                            cudaStream_t stream) {
  const int64_t total = out.numel();
  const bool small = std::max({in.numel(), total, tables.ints.numel(), tables.weights.numel()}) <
                     std::numeric_limits<int32_t>::max();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.scalar_type(), "resized_crop_flip", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto launch = [&](auto channels_last, auto index) {
          constexpr bool kCL = decltype(channels_last)::value;
          using index_t = decltype(index);
          auto kernel = kForward ? forward_kernel<scalar_t, acc_t, kCL, index_t>
                                 : backward_kernel<scalar_t, acc_t, kCL, index_t>;
          DELT_LAUNCH(kernel, blocks_for(total), kThreads, 0, stream, in.const_data_ptr<scalar_t>(),
                      out.mutable_data_ptr<scalar_t>(), tables.ints.const_data_ptr<int32_t>(),
                      tables.weights.const_data_ptr<acc_t>(), s, static_cast<index_t>(total),
                      static_cast<index_t>(in.size(1)), broadcast);
        };
        const bool cl = layout == Layout::kChannelsLast;
        if (small) {
          cl ? launch(std::true_type{}, uint32_t{}) : launch(std::false_type{}, uint32_t{});
        } else {
          cl ? launch(std::true_type{}, uint64_t{}) : launch(std::false_type{}, uint64_t{});
        }
      });
}

inline at::ScalarType accumulate_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor resized_crop_flip(const at::Tensor& x, const at::Tensor& params, int64_t out_h,
                                    int64_t out_w) {
  const char* op = "delt_ext::resized_crop_flip";
  crop::check_image(x, "x", op);
  crop::check_size(out_h, out_w, "(out_h, out_w)", op);
  crop::check_params(params, x, op);
  DELT_DEVICE_GUARD(x);
  const auto [xs, layout] = supported_layout(x);
  at::Tensor out = crop::empty_in_layout({x.size(0), x.size(1), out_h, out_w}, x, layout);
  const cudaStream_t stream = cuda::current_stream();
  const TableShape s{x.size(2), x.size(3), out_h, out_w};
  // Built (and so checked) even for an empty batch, as the CPU op checks every row.
  const DeviceTables tables =
      make_tables(params.contiguous(), s, accumulate_type_of(x.scalar_type()), false, stream);
  if (out.numel() == 0) return out;
  launch_elements<true>(xs, layout, tables, s, params.size(0) == 1, out, stream);
  return out;
}

inline at::Tensor resized_crop_flip_backward(const at::Tensor& grad_out, const at::Tensor& params,
                                             int64_t in_h, int64_t in_w) {
  const char* op = "delt_ext::resized_crop_flip_backward";
  crop::check_image(grad_out, "grad_out", op);
  crop::check_size(in_h, in_w, "(in_h, in_w)", op);
  crop::check_params(params, grad_out, op);
  DELT_DEVICE_GUARD(grad_out);
  const auto [gs, layout] = supported_layout(grad_out);
  at::Tensor grad_in =
      crop::empty_in_layout({grad_out.size(0), grad_out.size(1), in_h, in_w}, grad_out, layout);
  const cudaStream_t stream = cuda::current_stream();
  const TableShape s{in_h, in_w, grad_out.size(2), grad_out.size(3)};
  const DeviceTables tables =
      make_tables(params.contiguous(), s, accumulate_type_of(grad_out.scalar_type()), true, stream);
  if (grad_in.numel() == 0) return grad_in;
  launch_elements<false>(gs, layout, tables, s, params.size(0) == 1, grad_in, stream);
  return grad_in;
}

}  // namespace crop_cuda
}  // namespace delt_ext
