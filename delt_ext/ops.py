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


def _backward_batch_mean_var(ctx, grad_mean: Tensor | None, grad_var: Tensor | None):
    x, mean = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
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


def _backward_bn_stat_loss(ctx, grad_loss, grad_mean, grad_var, _grad_coef):
    x, mean, coef = ctx.saved_tensors
    grad_x = grad_running_mean = grad_running_var = None
    if ctx.needs_input_grad[0]:
        if grad_mean is None and grad_var is None:
            # The usual case (only the loss is used): the scale is read inside the kernel.
            grad_x = torch.ops.delt_ext.batch_stat_backward(x, mean, coef[0], coef[1], grad_loss)
        else:
            total_mean = grad_loss * coef[0]
            total_var = grad_loss * coef[1]
            if grad_mean is not None:
                total_mean = total_mean + grad_mean
            if grad_var is not None:
                total_var = total_var + grad_var
            grad_x = torch.ops.delt_ext.batch_stat_backward(x, mean, total_mean, total_var, None)
    # The targets enter as -(mean - target): dL/dtarget = -g * coef.
    if ctx.needs_input_grad[1]:
        grad_running_mean = (-grad_loss * coef[0]).to(ctx.target_dtypes[0])
    if ctx.needs_input_grad[2]:
        grad_running_var = (-grad_loss * coef[1]).to(ctx.target_dtypes[1])
    return grad_x, grad_running_mean, grad_running_var


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
