// Shared pieces of the resized_crop_flip ops: argument checks, decoding of a params row, and the
// per-axis bilinear taps. The sampling functions are host/device, so the CPU and CUDA kernels
// sample with the same arithmetic.
//
// Semantics (schemas in csrc/resized_crop_flip.cpp). For a params row
// [top, left, height, width, flip, shift_y, shift_x] and an output of size (out_h, out_w):
//   pre = bilinear resize of x[:, :, top:top+height, left:left+width] to (out_h, out_w),
//         align_corners=False, no antialias (torchvision resized_crop with antialias=False);
//   out = torch.roll(hflip(pre) if flip else pre, (shift_y, shift_x), dims=(2, 3)).
// Per axis, pre-index p (0 <= p < out) samples the crop at
//   src = max(fma(scale, p + 0.5, -0.5), 0),  scale = in / out  (in = crop height or width),
//   i0 = floor(src), i1 = min(i0 + 1, in - 1), w1 = src - i0, w0 = 1 - w1,
// PyTorch's upsample_bilinear2d, computed in the accumulate type (float, double for double).
// Taps never leave the crop box. Roll and flip only permute output indices:
//   row i  <- p = (i - shift_y) mod out_h,
//   col j  <- j' = (j - shift_x) mod out_w,  p = flip ? out_w - 1 - j' : j'.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "bn_stat.h"  // Layout, supported_layout, is_supported_float

namespace delt_ext {
namespace crop {

constexpr int64_t kParamColumns = 7;  // top, left, height, width, flip, shift_y, shift_x

// A params row as integers; shifts are reduced to [0, out_h) and [0, out_w).
struct Box {
  int64_t top, left, height, width;
  bool flip;
  int64_t shift_y, shift_x;
};

// Nearest integer to v, clamped to [lo, hi]; NaN gives lo. Valid params are integers inside the
// image already (both backends check every row before sampling); the clamps are a second line of
// defence: whatever a row holds, no kernel reads outside x.
C10_HOST_DEVICE inline int64_t clamped_integer(double v, int64_t lo, int64_t hi) {
  if (!(v >= static_cast<double>(lo))) return lo;
  if (v >= static_cast<double>(hi)) return hi;
  return static_cast<int64_t>(floor(v + 0.5));
}

// Nearest integer to v modulo n, in [0, n); non-finite values give 0.
C10_HOST_DEVICE inline int64_t wrapped_shift(double v, int64_t n) {
  if (!(v - v == 0.0)) return 0;                            // inf - inf and NaN - NaN are NaN
  double s = fmod(floor(v + 0.5), static_cast<double>(n));  // exact for integers
  if (s < 0) s += static_cast<double>(n);
  return static_cast<int64_t>(s);
}

template <typename param_t>
C10_HOST_DEVICE inline Box decode_box(const param_t* row, int64_t in_h, int64_t in_w, int64_t out_h,
                                      int64_t out_w) {
  Box b;
  b.top = clamped_integer(static_cast<double>(row[0]), 0, in_h - 1);
  b.left = clamped_integer(static_cast<double>(row[1]), 0, in_w - 1);
  b.height = clamped_integer(static_cast<double>(row[2]), 1, in_h - b.top);
  b.width = clamped_integer(static_cast<double>(row[3]), 1, in_w - b.left);
  b.flip = static_cast<double>(row[4]) >= 0.5;
  b.shift_y = wrapped_shift(static_cast<double>(row[5]), out_h);
  b.shift_x = wrapped_shift(static_cast<double>(row[6]), out_w);
  return b;
}

// True when a params row passes every value check of check_param_values below (finite integers,
// a box of height and width >= 1 inside the in_h x in_w image, flip 0 or 1). The CUDA kernels
// check each row with it on the device (params there are never copied to the host).
template <typename param_t>
C10_HOST_DEVICE inline bool params_row_valid(const param_t* row, int64_t in_h, int64_t in_w) {
  for (int64_t k = 0; k < kParamColumns; ++k) {
    const double v = static_cast<double>(row[k]);
    if (!(v - v == 0.0) || v != floor(v)) return false;  // NaN, +-inf, or not an integer
  }
  const double top = row[0], left = row[1], height = row[2], width = row[3], flip = row[4];
  return height >= 1 && width >= 1 && top >= 0 && left >= 0 &&
         top + height <= static_cast<double>(in_h) && left + width <= static_cast<double>(in_w) &&
         (flip == 0 || flip == 1);
}

// The two taps of pre-index p, as indices into the crop (0 <= i0 <= i1 < in) and weights.
template <typename acc_t>
struct Taps {
  int64_t i0, i1;
  acc_t w0, w1;
};

// a * b + c rounded once. PyTorch's kernels get src from one fused multiply-add (its AVX2 CPU
// build and nvcc contract the expression), so writing the FMA out reproduces its weights bit for
// bit on every backend; a separate multiply and add moves lambda by up to an ulp of src.
C10_HOST_DEVICE inline float fused_multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
C10_HOST_DEVICE inline double fused_multiply_add(double a, double b, double c) {
  return fma(a, b, c);
}

// Sampling step of an axis: crop length / output length.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t axis_scale(int64_t in, int64_t out) {
  return static_cast<acc_t>(in) / static_cast<acc_t>(out);
}

// in: the crop length; scale: axis_scale(in, out).
template <typename acc_t>
C10_HOST_DEVICE inline Taps<acc_t> source_taps(int64_t p, int64_t in, acc_t scale) {
  acc_t src = fused_multiply_add(scale, static_cast<acc_t>(p) + acc_t(0.5), acc_t(-0.5));
  if (src < acc_t(0)) src = acc_t(0);
  Taps<acc_t> t;
  t.i0 = static_cast<int64_t>(src);  // floor, since src >= 0
  if (t.i0 > in - 1) t.i0 = in - 1;
  acc_t lambda = src - static_cast<acc_t>(t.i0);
  if (lambda > acc_t(1)) lambda = acc_t(1);
  t.w1 = lambda;
  t.w0 = acc_t(1) - lambda;
  // With lambda == 0 (e.g. in == out) the second tap is the first pixel again, with weight 0:
  // the kernels skip zero-weight taps, so the value is then exactly x[i0], as PyTorch's copy path
  // and torchvision's "no resize" shortcut give, even next to a non-finite pixel.
  t.i1 = (t.i0 < in - 1 && lambda != acc_t(0)) ? t.i0 + 1 : t.i0;
  return t;
}

// Weight with which pre-index taps t read crop index r (both taps may hit r).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t tap_weight(int64_t i0, int64_t i1, acc_t w0, acc_t w1, int64_t r) {
  return (i0 == r ? w0 : acc_t(0)) + (i1 == r ? w1 : acc_t(0));
}

// First pre-index p in [0, out] with i0(p) >= target (out if none). i0 is monotone in p: every
// step of its computation (p + 0.5, a correctly rounded fma with a positive scale, max, floor,
// min) is.
template <typename acc_t>
C10_HOST_DEVICE inline int64_t first_tap_at_least(int64_t target, int64_t in, int64_t out,
                                                  acc_t scale) {
  int64_t lo = 0, hi = out;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (source_taps<acc_t>(mid, in, scale).i0 >= target) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// The pre-indices that read crop index r form one contiguous range [begin, end): those with
// i0(p) in {r - 1, r}, since i1 is i0 or i0 + 1. (Some may read r with weight 0.)
template <typename acc_t>
C10_HOST_DEVICE inline void readers_of(int64_t r, int64_t in, int64_t out, acc_t scale,
                                       int64_t& begin, int64_t& end) {
  begin = first_tap_at_least<acc_t>(r - 1, in, out, scale);
  end = first_tap_at_least<acc_t>(r + 1, in, out, scale);
}

// One axis of a params row: the crop's start and length along it, the output length, and the
// roll (and, for columns, the flip) that permute output indices.
struct Axis {
  int64_t start, length, out, shift;
  bool flip;
};

C10_HOST_DEVICE inline Axis row_axis(const Box& b, int64_t out_h) {
  return Axis{b.top, b.height, out_h, b.shift_y, false};
}

C10_HOST_DEVICE inline Axis col_axis(const Box& b, int64_t out_w) {
  return Axis{b.left, b.width, out_w, b.shift_x, b.flip};
}

// Pre-index (before flip and roll) of output index o, and the output index of pre-index p.
C10_HOST_DEVICE inline int64_t pre_index(const Axis& a, int64_t o) {
  int64_t q = o - a.shift;  // undo the roll: 0 <= shift < out
  if (q < 0) q += a.out;
  return a.flip ? a.out - 1 - q : q;
}

C10_HOST_DEVICE inline int64_t output_index(const Axis& a, int64_t p) {
  const int64_t q = a.flip ? a.out - 1 - p : p;
  const int64_t o = q + a.shift;
  return o >= a.out ? o - a.out : o;
}

// ---- host-side argument checks, shared by the CPU and CUDA entry points -----------------------

inline void check_image(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D (N, C, H, W) tensor, got ", t.dim(),
              "-D with shape ", t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.size(2) > 0 && t.size(3) > 0, op, ": ", name,
              " must have a non-empty image (H, W >= 1), got shape ", t.sizes());
  TORCH_CHECK(t.size(2) < (int64_t{1} << 30) && t.size(3) < (int64_t{1} << 30), op, ": ", name,
              " must be smaller than 2^30 pixels per side, got shape ", t.sizes());
}

inline void check_size(int64_t h, int64_t w, const char* what, const char* op) {
  TORCH_CHECK(h > 0 && w > 0, op, ": ", what, " must be positive, got (", h, ", ", w, ")");
  TORCH_CHECK(h < (int64_t{1} << 30) && w < (int64_t{1} << 30), op, ": ", what,
              " must be below 2^30, got (", h, ", ", w, ")");
}

inline void check_params(const at::Tensor& params, const at::Tensor& image, const char* op) {
  TORCH_CHECK(params.dim() == 2 && params.size(1) == kParamColumns &&
                  (params.size(0) == 1 || params.size(0) == image.size(0)),
              op, ": params must have shape (N, 7) or (1, 7) with N = ", image.size(0),
              " (columns top, left, height, width, flip, shift_y, shift_x), got ", params.sizes());
  TORCH_CHECK(params.scalar_type() == at::kFloat || params.scalar_type() == at::kDouble, op,
              ": params must be float32 or float64, got ", params.scalar_type());
  TORCH_CHECK(params.device() == image.device(), op, ": params is on ", params.device(),
              " but the image is on ", image.device());
}

// Result tensors are written in the layout the kernels read their input in (supported_layout):
// channels_last input gives channels_last output. delt_ext/ops.py (layout_format) mirrors this.
inline at::Tensor empty_in_layout(at::IntArrayRef sizes, const at::Tensor& like, Layout layout) {
  return at::empty(sizes, like.options().memory_format(layout == Layout::kChannelsLast
                                                           ? at::MemoryFormat::ChannelsLast
                                                           : at::MemoryFormat::Contiguous));
}

// Value checks of CPU params (cheap there: no device sync), with a message naming the row and
// column. CUDA params are checked on the device with params_row_valid (the same rules).
inline void check_param_values(const at::Tensor& params_cpu_double, int64_t in_h, int64_t in_w,
                               const char* op) {
  const double* p = params_cpu_double.const_data_ptr<double>();
  for (int64_t r = 0; r < params_cpu_double.size(0); ++r) {
    const double* row = p + r * kParamColumns;
    for (int64_t k = 0; k < kParamColumns; ++k) {
      TORCH_CHECK(std::isfinite(row[k]) && row[k] == std::nearbyint(row[k]), op,
                  ": params must hold integers (row ", r, ", column ", k, " is ", row[k], ")");
    }
    const double top = row[0], left = row[1], height = row[2], width = row[3], flip = row[4];
    TORCH_CHECK(height >= 1 && width >= 1, op, ": crop height and width must be >= 1 (row ", r,
                ": height ", height, ", width ", width, ")");
    TORCH_CHECK(top >= 0 && left >= 0 && top + height <= static_cast<double>(in_h) &&
                    left + width <= static_cast<double>(in_w),
                op, ": crop box (top ", top, ", left ", left, ", height ", height, ", width ",
                width, ") of row ", r, " is outside the ", in_h, "x", in_w, " image");
    TORCH_CHECK(flip == 0 || flip == 1, op, ": flip must be 0 or 1 (row ", r, " is ", flip, ")");
  }
}

}  // namespace crop
}  // namespace delt_ext
