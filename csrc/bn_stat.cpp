// Schemas of the BN-statistic ops. Kernels: csrc/cpu/bn_stat_kernel.cpp,
// csrc/cuda/bn_stat_kernel.cu; fake kernels and autograd: delt_ext/ops.py.

#include <torch/library.h>

#include "build_info.h"

namespace delt_ext {

TORCH_LIBRARY_FRAGMENT(delt_ext, m) {
  // Per-channel mean and biased variance over (N, H, W) of a 4-D x; float32 (float64 for
  // float64 x), shape (C,).
  m.def("batch_mean_var(Tensor x) -> (Tensor mean, Tensor var)");
  // SRe2L's BN-statistic loss ||mean - running_mean||_2 + ||var - running_var||_2 (0-dim), with
  // the batch statistics and coef = [dL/dmean; dL/dvar], shape (2, C), kept for the backward.
  m.def(
      "bn_stat_loss(Tensor x, Tensor running_mean, Tensor running_var) "
      "-> (Tensor loss, Tensor mean, Tensor var, Tensor coef)");
  // dx = grad_scale * (grad_mean_c + 2 * grad_var_c * (x - mean_c)) / (N * H * W), laid out like
  // x. The backward of both ops above; grad_scale (one value) defaults to 1.
  m.def(
      "batch_stat_backward(Tensor x, Tensor mean, Tensor grad_mean, Tensor grad_var, "
      "Tensor? grad_scale) -> Tensor");
  // The grouped loss: sample n of x belongs to group group_index[n] in [0, G); targets are
  // (G, C). Per group g (its samples x H x W): mean (G, C), biased var (G, C), the group's loss
  // ||mean_g - target_mean_g||_2 + ||var_g - target_var_g||_2 (group_loss, (G,)) and
  // coef = [dL_g/dmean_g; dL_g/dvar_g], (2, G, C); loss = sum_g weight_g * group_loss_g (weight
  // defaults to 1). A group without samples has NaN statistics and adds nothing (group_loss 0,
  // coef 0). An index outside [0, G) is an error.
  m.def(
      "bn_stat_loss_grouped(Tensor x, Tensor group_index, Tensor target_mean, Tensor target_var, "
      "Tensor? weight) -> (Tensor loss, Tensor group_loss, Tensor mean, Tensor var, Tensor coef)");
  // dx = s_g * (grad_mean_gc + 2 * grad_var_gc * (x - mean_gc)) / M_g for a sample of group g
  // (M_g = its group's samples x H x W), laid out like x; grad_scale: one value or (G,), default 1.
  m.def(
      "grouped_stat_backward(Tensor x, Tensor group_index, Tensor mean, Tensor grad_mean, "
      "Tensor grad_var, Tensor? grad_scale) -> Tensor");
}

#ifndef WITH_CUDA
TORCH_LIBRARY_IMPL(delt_ext, CUDA, m) {
  register_missing_cuda(m, {"batch_mean_var", "bn_stat_loss", "batch_stat_backward",
                            "bn_stat_loss_grouped", "grouped_stat_backward"});
}
#endif

}  // namespace delt_ext
