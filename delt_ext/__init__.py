"""delt_ext: fused C++/CUDA kernels for large-scale dataset distillation.

Public API:
    bn_stat_loss(x, running_mean, running_var)   fused BN-statistic matching loss of one layer
    batch_mean_var(x)                            per-channel batch mean and biased variance
    image_channel_sums(x)                        float64 per-image channel sums of x and x²
    BNStatMatching(model, first_bn_multiplier)   the loss over every BN layer of a model
    resized_crop_flip(x, params, size)           fused crop + bilinear resize + flip + roll
    RandomResizedCropFlip(size, ...)             its sampler (torchvision's rule), per image/batch
    crop_scale_schedule(iteration, total, ...)   CDA/DELT easy-to-hard minimum crop scale
    reference                                    the same semantics in plain PyTorch
    build_info()                                 how the installed package was built
"""

from delt_ext import ops, reference  # noqa: F401  (ops registers fake kernels and autograd)
from delt_ext._library import HAS_OPS
from delt_ext._version import __version__
from delt_ext.augment import RandomResizedCropFlip, crop_scale_schedule, resized_crop_flip
from delt_ext.bn_matching import BNStatMatching
from delt_ext.build_info import BuildInfo, build_info
from delt_ext.functional import batch_mean_var, bn_stat_loss, image_channel_sums

__all__ = [
    "HAS_OPS",
    "BNStatMatching",
    "BuildInfo",
    "RandomResizedCropFlip",
    "__version__",
    "batch_mean_var",
    "bn_stat_loss",
    "build_info",
    "crop_scale_schedule",
    "image_channel_sums",
    "reference",
    "resized_crop_flip",
]
