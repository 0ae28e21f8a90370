"""Drop-in replacements for the research code's BN hooks: change one import line, nothing else.

SRe2L (``SRe2L/recover``, its ``multi_gpu`` and small-dataset folders), CDA, SC-DD and DELT each
carry a copy of the same ``BNFeatureHook`` class in their ``utils.py``. :class:`BNFeatureHook`
here has its interface: built from a BN module, it registers a forward hook on it, holds the
layer's loss in ``.r_feature`` after each forward pass, and ``.close()`` removes the hook. Their
loops (the hook list, the ``rescale`` list, ``sum(mod.r_feature * rescale[idx] ...)``, DELT's
forward of the active sub-batch only) keep working unchanged; only the loss is computed by the
fused :func:`delt_ext.bn_stat_loss` instead of a permuted copy of every BN input::

    from utils import *                          # their helpers (and their BNFeatureHook)
    from delt_ext.compat import BNFeatureHook    # the one added line: shadows theirs
"""

from torch import Tensor, nn

from delt_ext.bn_matching import refuse_replica
from delt_ext.functional import bn_stat_loss

PRECISIONS = ("float32", "eager")


def eager_bn_feature(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """The research hook's formula, evaluated in ``x``'s own dtype (bf16 under autocast).

    The per-channel mean and biased variance of ``x`` over (N, H, W), computed by the same
    sequence of torch ops as their hook (a permuted, contiguous copy for the variance), so the
    value and gradient are theirs to the last bit, also under ``torch.autocast``. Slow: one copy
    of ``x`` kept for backward.
    """
    channels = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().reshape([channels, -1]).var(1, unbiased=False)
    return (running_var.detach() - var).norm(2) + (running_mean.detach() - mean).norm(2)


class BNFeatureHook:
    """SRe2L's ``BNFeatureHook``, with the layer's loss computed by the fused op.

    After every forward pass of ``module``, ``self.r_feature`` is the 0-dim tensor
    ``||running_var - var(x)||_2 + ||running_mean - mean(x)||_2``, differentiable in the layer's
    input ``x`` (N, C, H, W), with the running statistics read after the forward as theirs are
    (identical before and after for a teacher in ``eval()``, the normal case).

    Precision: by default the statistics accumulate in float32 whatever ``x``'s dtype, so under
    ``torch.autocast(dtype=torch.bfloat16)`` the value and gradient are closer to the exact ones
    than the research hook's, which computes the mean and variance in bfloat16, and the two are
    not bit-comparable (gradients differ by about 1e-2 relative). ``precision="eager"`` runs
    their formula in ``x``'s dtype instead (their numbers, at their speed).

    ``nn.DataParallel``: with one visible GPU (SRe2L's, CDA's and DELT's default wrapper) it
    calls the module itself and this works as it is. With several GPUs its replicas would each
    overwrite ``r_feature`` with the loss of their part of the batch (their hook's silent race);
    here the first replica call raises a ``RuntimeError`` instead. Make one GPU visible or run
    one process per GPU.

    Args:
        module: a BatchNorm layer (anything with ``running_mean`` and ``running_var`` tensors).
        precision: ``"float32"`` (fused op, default) or ``"eager"`` (their formula and dtype).
    """

    def __init__(self, module: nn.Module, precision: str = "float32") -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(getattr(module, "running_mean", None), Tensor) or not isinstance(
            getattr(module, "running_var", None), Tensor
        ):
            raise ValueError(
                f"module ({type(module).__name__}) keeps no running_mean/running_var tensors: "
                "BNFeatureHook needs a BatchNorm layer with track_running_stats=True"
            )
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self._module = module
        self._name = f"{type(module).__name__}({module.running_mean.shape[0]})"
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module: nn.Module, input: tuple, output: Tensor) -> None:
        refuse_replica("BNFeatureHook", self._name, module, self._module)
        x = input[0]
        if self.precision == "eager":
            self.r_feature = eager_bn_feature(x, module.running_mean, module.running_var)
        else:
            self.r_feature = bn_stat_loss(
                x, module.running_mean.detach(), module.running_var.detach()
            )

    def close(self) -> None:
        """Removes the hook (``self.r_feature`` keeps its last value)."""
        self.hook.remove()

    def __repr__(self) -> str:
        return f"BNFeatureHook({self._name}, precision={self.precision!r})"
