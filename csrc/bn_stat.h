// Shared declarations of the BN-statistic ops: argument checks and layout selection used by
// every backend. The math of the ops is documented in csrc/cpu/bn_stat_kernel.cpp.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace delt_ext {

// The two memory layouts the kernels read and write without copies.
enum class Layout { kNCHW, kChannelsLast };

// Returns x itself when it is NCHW- or channels_last-contiguous, else an NCHW-contiguous copy.
// A tensor that is both (C == 1, or H == W == 1) is read as NCHW: its linear order is the same.
inline std::pair<at::Tensor, Layout> supported_layout(const at::Tensor& x) {
  if (x.is_contiguous()) {
    return {x, Layout::kNCHW};
  }
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return {x, Layout::kChannelsLast};
  }
  return {x.contiguous(), Layout::kNCHW};
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Statistics are accumulated and returned in float32, or float64 for float64 inputs.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_stat_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (N, C, H, W) tensor, got ", x.dim(),
              "-D with shape ", x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()), op,
              ": x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, op, ": x must have at least one channel, got shape ", x.sizes());
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 0, op,
              ": x holds no elements per channel (empty batch or zero spatial size), shape ",
              x.sizes());
}

// running_mean / running_var: 1-D, one value per channel, floating, on x's device.
inline void check_stat_target(const at::Tensor& t, const at::Tensor& x, const char* name,
                              const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name,
              " must be a 1-D tensor with one value per channel of x (", x.size(1),
              "), got shape ", t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

// Checks of the backward op's per-channel inputs (mean, grad_mean, grad_var).
inline void check_channel_vector(const at::Tensor& t, const at::Tensor& x, const char* name,
                                 const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name,
              " must have one value per channel (", x.size(1), "), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == accumulate_type(x.scalar_type()), op, ": ", name, " must be ",
              accumulate_type(x.scalar_type()), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

inline void check_grad_scale(const c10::optional<at::Tensor>& s, const at::Tensor& x,
                             const char* op) {
  if (!s.has_value()) return;
  TORCH_CHECK(s->numel() == 1, op, ": grad_scale must hold one value, got shape ", s->sizes());
  TORCH_CHECK(s->device() == x.device(), op, ": grad_scale is on ", s->device(),
              " but x is on ", x.device());
}

// Gives the result of a kernel that wrote `computed` (laid out like the tensor it worked on) the
// strides of empty_like(x), which is what the fake kernels promise. Copies only for inputs that
// are neither NCHW- nor channels_last-contiguous.
inline at::Tensor with_strides_of(const at::Tensor& computed, const at::Tensor& x) {
  if (computed.strides() == x.strides()) return computed;
  at::Tensor out = at::empty_like(x);
  if (out.strides() == computed.strides()) return computed;
  return out.copy_(computed);
}

}  // namespace delt_ext
