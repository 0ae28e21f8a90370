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
              " must be a 1-D tensor with one value per channel of x (", x.size(1), "), got shape ",
              t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// Checks of the backward op's per-channel inputs (mean, grad_mean, grad_var).
inline void check_channel_vector(const at::Tensor& t, const at::Tensor& x, const char* name,
                                 const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name,
              " must have one value per channel (", x.size(1), "), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == accumulate_type(x.scalar_type()), op, ": ", name, " must be ",
              accumulate_type(x.scalar_type()), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

inline void check_grad_scale(const c10::optional<at::Tensor>& s, const at::Tensor& x,
                             const char* op) {
  if (!s.has_value()) return;
  TORCH_CHECK(s->numel() == 1, op, ": grad_scale must hold one value, got shape ", s->sizes());
  TORCH_CHECK(s->device() == x.device(), op, ": grad_scale is on ", s->device(), " but x is on ",
              x.device());
}

// ---- grouped statistics (bn_stat_loss_grouped, grouped_stat_backward) ----------------------

// group_index: (N,) int64 on x's device, one group per sample of x.
inline void check_group_index(const at::Tensor& index, const at::Tensor& x, const char* op) {
  TORCH_CHECK(index.dim() == 1 && index.size(0) == x.size(0), op,
              ": group_index must be a 1-D tensor with one group per sample of x (", x.size(0),
              "), got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": group_index must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(index.device() == x.device(), op, ": group_index is on ", index.device(),
              " but x is on ", x.device());
}

// Per-group targets: (G, C) floating on x's device, G >= 1; returns G.
inline int64_t check_group_target(const at::Tensor& t, const at::Tensor& x, const char* name,
                                  const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) >= 1 && t.size(1) == x.size(1), op, ": ", name,
              " must be a 2-D (G, C) tensor, one row per group and one value per channel of x (",
              x.size(1), "), G >= 1, got shape ", t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  return t.size(0);
}

// Optional per-group loss weights: (G,) floating on x's device.
inline void check_group_weight(const c10::optional<at::Tensor>& w, int64_t G, const at::Tensor& x,
                               const char* op) {
  if (!w.has_value()) return;
  TORCH_CHECK(w->dim() == 1 && w->size(0) == G, op,
              ": weight must be a 1-D tensor with one value per group (", G, "), got shape ",
              w->sizes());
  TORCH_CHECK(is_supported_float(w->scalar_type()), op, ": weight must be a floating tensor, got ",
              w->scalar_type());
  TORCH_CHECK(w->device() == x.device(), op, ": weight is on ", w->device(), " but x is on ",
              x.device());
}

// The backward's per-group tables (mean, grad_mean, grad_var): (G, C) in x's accumulate dtype.
inline void check_group_table(const at::Tensor& t, const at::Tensor& x, int64_t G, const char* name,
                              const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == G && t.size(1) == x.size(1), op, ": ", name,
              " must have shape (G, C) = (", G, ", ", x.size(1), "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == accumulate_type(x.scalar_type()), op, ": ", name, " must be ",
              accumulate_type(x.scalar_type()), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// grad_scale of the grouped backward: one value, or one per group.
inline void check_group_scale(const c10::optional<at::Tensor>& s, int64_t G, const at::Tensor& x,
                              const char* op) {
  if (!s.has_value()) return;
  TORCH_CHECK(s->numel() == 1 || (s->dim() == 1 && s->size(0) == G), op,
              ": grad_scale must hold one value or one per group (", G, "), got shape ",
              s->sizes());
  TORCH_CHECK(s->device() == x.device(), op, ": grad_scale is on ", s->device(), " but x is on ",
              x.device());
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
