"""Fake kernels and autograd of the compiled ops, registered with ``torch.library``.

The schemas and kernels are in ``csrc/``; this module makes the ops traceable by
``torch.compile`` (fake kernels) and differentiable (``register_autograd``, whose backward is
itself a compiled op). Nothing is registered when the compiled library is not loaded.
"""

import torch
from torch import Tensor

from delt_ext._library import HAS_OPS


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which statistics are accumulated and returned: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_vector(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=accumulate_dtype(x.dtype))


def _fake_batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    torch._check(x.dim() == 4, lambda: f"x must be 4-D, got {x.dim()}-D")
    return _channel_vector(x), _channel_vector(x)


def _fake_bn_stat_loss(
    x: Tensor, running_mean: Tensor, running_var: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    torch._check(x.dim() == 4, lambda: f"x must be 4-D, got {x.dim()}-D")
    dtype = accumulate_dtype(x.dtype)
    loss = x.new_empty((), dtype=dtype)
    coef = x.new_empty((2, x.shape[1]), dtype=dtype)
    return loss, _channel_vector(x), _channel_vector(x), coef


def _fake_batch_stat_backward(
    x: Tensor, mean: Tensor, grad_mean: Tensor, grad_var: Tensor, grad_scale: Tensor | None
) -> Tensor:
    return torch.empty_like(x)


def _setup_batch_mean_var(ctx, inputs, output) -> None:
    (x,) = inputs
    mean, _ = output
    ctx.save_for_backward(x, mean)
    # An unused output gets None, not a materialized zero tensor.
    ctx.set_materialize_grads(False)


def _backward_batch_mean_var(ctx, grad_mean: Tensor | None, grad_var: Tensor | None):
    x, mean = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (grad_mean is None and grad_var is None):
        return None
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
    grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
    return torch.ops.delt_ext.batch_stat_backward(x, mean, grad_mean, grad_var, None)


def _setup_bn_stat_loss(ctx, inputs, output) -> None:
    x, running_mean, running_var = inputs
    _, mean, _, coef = output
    ctx.save_for_backward(x, mean, coef)
    ctx.mark_non_differentiable(coef)
    ctx.target_dtypes = (running_mean.dtype, running_var.dtype)
    # Unused outputs (mean, var: the usual case) get None instead of zero tensors, so the
    # backward below takes its fast path: one kernel, no elementwise ops on zeros.
    ctx.set_materialize_grads(False)


def _sum_or_zeros(a: Tensor | None, b: Tensor | None, like: Tensor) -> Tensor:
    if a is None and b is None:
        return torch.zeros_like(like)
    return b if a is None else (a if b is None else a + b)


def _backward_bn_stat_loss(ctx, grad_loss, grad_mean, grad_var, _grad_coef):
    x, mean, coef = ctx.saved_tensors
    grad_x = grad_running_mean = grad_running_var = None
    if ctx.needs_input_grad[0]:
        if grad_mean is None and grad_var is None:
            if grad_loss is not None:
                # The usual case (only the loss is used): the scale is read inside the kernel.
                grad_x = torch.ops.delt_ext.batch_stat_backward(
                    x, mean, coef[0], coef[1], grad_loss
                )
        else:
            scaled_mean = None if grad_loss is None else grad_loss * coef[0]
            scaled_var = None if grad_loss is None else grad_loss * coef[1]
            total_mean = _sum_or_zeros(scaled_mean, grad_mean, mean)
            total_var = _sum_or_zeros(scaled_var, grad_var, mean)
            grad_x = torch.ops.delt_ext.batch_stat_backward(x, mean, total_mean, total_var, None)
    # The targets enter as -(mean - target): dL/dtarget = -g * coef.
    if grad_loss is not None and ctx.needs_input_grad[1]:
        grad_running_mean = (-grad_loss * coef[0]).to(ctx.target_dtypes[0])
    if grad_loss is not None and ctx.needs_input_grad[2]:
        grad_running_var = (-grad_loss * coef[1]).to(ctx.target_dtypes[1])
    return grad_x, grad_running_mean, grad_running_var


def _fake_bn_stat_loss_grouped(
    x: Tensor, group_index: Tensor, target_mean: Tensor, target_var: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    torch._check(x.dim() == 4, lambda: f"x must be 4-D, got {x.dim()}-D")
    torch._check(target_mean.dim() == 2, lambda: "target_mean must be (G, C)")
    dtype = accumulate_dtype(x.dtype)
    groups, channels = target_mean.shape
    table = x.new_empty((groups, channels), dtype=dtype)
    return (
        x.new_empty((), dtype=dtype),
        x.new_empty((groups,), dtype=dtype),
        table,
        torch.empty_like(table),
        x.new_empty((2, groups, channels), dtype=dtype),
    )


def _fake_grouped_stat_backward(
    x: Tensor,
    group_index: Tensor,
    mean: Tensor,
    grad_mean: Tensor,
    grad_var: Tensor,
    grad_scale: Tensor | None,
) -> Tensor:
    return torch.empty_like(x)


def _setup_bn_stat_loss_grouped(ctx, inputs, output) -> None:
    x, group_index, target_mean, target_var, weight = inputs
    _, group_loss, mean, _, coef = output
    ctx.save_for_backward(x, group_index, mean, coef, weight, group_loss)
    ctx.mark_non_differentiable(coef)
    ctx.input_dtypes = (
        target_mean.dtype,
        target_var.dtype,
        None if weight is None else weight.dtype,
    )
    ctx.set_materialize_grads(False)


def _backward_bn_stat_loss_grouped(ctx, grad_loss, grad_group_loss, grad_mean, grad_var, _coef):
    x, group_index, mean, coef, weight, group_loss = ctx.saved_tensors
    # dL/dgroup_loss_g: grad_loss * weight_g, plus the gradient of the group_loss output.
    scale = None
    if grad_loss is not None:
        scale = grad_loss if weight is None else grad_loss * weight.to(coef.dtype)
    if grad_group_loss is not None:
        scale = grad_group_loss if scale is None else scale + grad_group_loss
    # The scale per (group, channel) entry of the coefficient tables: () or (G, 1).
    table_scale = None if scale is None else (scale if scale.dim() == 0 else scale[:, None])
    grad_x = grad_target_mean = grad_target_var = grad_weight = None
    if ctx.needs_input_grad[0]:
        if grad_mean is None and grad_var is None:
            if scale is not None:
                # The usual case (only the loss is used): one kernel, the scale read inside it.
                grad_x = torch.ops.delt_ext.grouped_stat_backward(
                    x, group_index, mean, coef[0], coef[1], scale
                )
        else:
            scaled_mean = None if scale is None else table_scale * coef[0]
            scaled_var = None if scale is None else table_scale * coef[1]
            total_mean = _sum_or_zeros(scaled_mean, grad_mean, mean)
            total_var = _sum_or_zeros(scaled_var, grad_var, mean)
            grad_x = torch.ops.delt_ext.grouped_stat_backward(
                x, group_index, mean, total_mean, total_var, None
            )
    if any(ctx.needs_input_grad[2:]):
        # The targets and weight of a group without samples get 0, whatever the scale (an
        # infinite weight times its zero coefficients would give NaN).
        present = torch.zeros(group_loss.shape, dtype=torch.bool, device=group_loss.device)
        present = present.index_fill(0, group_index, True)
        if scale is not None and ctx.needs_input_grad[2]:
            value = torch.where(present[:, None], -table_scale * coef[0], 0)
            grad_target_mean = value.to(ctx.input_dtypes[0])
        if scale is not None and ctx.needs_input_grad[3]:
            value = torch.where(present[:, None], -table_scale * coef[1], 0)
            grad_target_var = value.to(ctx.input_dtypes[1])
        if grad_loss is not None and ctx.needs_input_grad[4]:
            value = torch.where(present, grad_loss * group_loss, 0)
            grad_weight = value.to(ctx.input_dtypes[2])
    return grad_x, None, grad_target_mean, grad_target_var, grad_weight


if HAS_OPS:
    torch.library.register_fake("delt_ext::batch_mean_var", _fake_batch_mean_var)
    torch.library.register_fake("delt_ext::bn_stat_loss", _fake_bn_stat_loss)
    torch.library.register_fake("delt_ext::batch_stat_backward", _fake_batch_stat_backward)
    torch.library.register_autograd(
        "delt_ext::batch_mean_var", _backward_batch_mean_var, setup_context=_setup_batch_mean_var
    )
    torch.library.register_autograd(
        "delt_ext::bn_stat_loss", _backward_bn_stat_loss, setup_context=_setup_bn_stat_loss
    )
    torch.library.register_fake("delt_ext::bn_stat_loss_grouped", _fake_bn_stat_loss_grouped)
    torch.library.register_fake("delt_ext::grouped_stat_backward", _fake_grouped_stat_backward)
    torch.library.register_autograd(
        "delt_ext::bn_stat_loss_grouped",
        _backward_bn_stat_loss_grouped,
        setup_context=_setup_bn_stat_loss_grouped,
    )


def _fake_image_channel_sums(x: Tensor) -> tuple[Tensor, Tensor]:
    torch._check(x.dim() == 4, lambda: f"x must be 4-D, got {x.dim()}-D")
    table = x.new_empty((x.shape[0], x.shape[1]), dtype=torch.float64)
    return table, torch.empty_like(table)


if HAS_OPS:
    torch.library.register_fake("delt_ext::image_channel_sums", _fake_image_channel_sums)


# ---- resized_crop_flip (fused random-resized-crop + flip + roll) ------------------------------


def layout_format(t: Tensor) -> torch.memory_format:
    """Memory format the kernels read ``t`` in and write results in: channels_last when ``t`` is
    channels_last-contiguous and not NCHW-contiguous, else NCHW (other strides are copied)."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _fake_crop(image: Tensor, name: str, params: Tensor, height, width) -> Tensor:
    """Both crop ops' fake kernel: ``image`` (N, C, *, *) → (N, C, height, width), same layout."""
    torch._check(image.dim() == 4, lambda: f"{name} must be 4-D, got {image.dim()}-D")
    torch._check(params.dim() == 2 and params.shape[1] == 7, lambda: "params must be (N, 7)")
    return torch.empty(
        (image.shape[0], image.shape[1], height, width),
        dtype=image.dtype,
        device=image.device,
        memory_format=layout_format(image),
    )


def _fake_resized_crop_flip(x: Tensor, params: Tensor, out_h, out_w) -> Tensor:
    return _fake_crop(x, "x", params, out_h, out_w)


def _fake_resized_crop_flip_backward(grad_out: Tensor, params: Tensor, in_h, in_w) -> Tensor:
    return _fake_crop(grad_out, "grad_out", params, in_h, in_w)


# The two crop ops are linear in their image and each other's adjoint (the backward op is the
# forward's transpose), so each one's gradient is the other op with the same params, back to the
# image's size and layout. That also gives the forward a double backward.
def _setup_crop(ctx, inputs, output) -> None:
    image, params, _, _ = inputs
    ctx.save_for_backward(params)
    ctx.image_size = (image.shape[2], image.shape[3])
    ctx.memory_format = layout_format(image)


def _crop_backward(adjoint):
    def backward(ctx, grad: Tensor):
        (params,) = ctx.saved_tensors
        grad_image = None
        if ctx.needs_input_grad[0]:
            # The adjoint op writes its result laid out like grad; asking for the image's layout
            # here gives the image's layout (a copy only when grad has another layout).
            grad = grad.contiguous(memory_format=ctx.memory_format)
            grad_image = adjoint(grad, params, *ctx.image_size)
        # No gradient for params: the crop box, flip and shifts are discrete.
        return grad_image, None, None, None

    return backward


if HAS_OPS:
    torch.library.register_fake("delt_ext::resized_crop_flip", _fake_resized_crop_flip)
    torch.library.register_fake(
        "delt_ext::resized_crop_flip_backward", _fake_resized_crop_flip_backward
    )
    torch.library.register_autograd(
        "delt_ext::resized_crop_flip",
        _crop_backward(torch.ops.delt_ext.resized_crop_flip_backward),
        setup_context=_setup_crop,
    )
    torch.library.register_autograd(
        "delt_ext::resized_crop_flip_backward",
        _crop_backward(torch.ops.delt_ext.resized_crop_flip),
        setup_context=_setup_crop,
    )
