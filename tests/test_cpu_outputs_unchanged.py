"""The CPU kernels' results for ordinary finite input, bit for bit, against digests saved from the
kernels of main e216f25 (before the NaN/Inf and CUDA-emulation work).

The digests are SHA-256 of the raw bytes of every output (loss, statistics, coefficients,
gradients, augmented images). They were written by ``python tests/test_cpu_outputs_unchanged.py
--write`` on an x86-64 CPU with AVX2 and FMA: the CPU kernels have an AVX2+FMA build picked at
load time, whose rounding differs from the portable build, so the test only runs on such CPUs.
"""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import BN_LAYOUTS, DTYPES
from conftest import BN_SHAPES as SHARED_BN_SHAPES

DIGESTS = Path(__file__).with_name("data") / "cpu_kernel_digests.json"

BN_SHAPES = SHARED_BN_SHAPES + [(100, 64, 8, 8), (3000, 3, 4, 4), (16, 40, 7, 7)]
LAYOUTS = BN_LAYOUTS


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _bn_input(shape, dtype, layout, seed):
    generator = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "strided":
        x = torch.randn(n, c, h, 2 * w, generator=generator)[..., ::2]
    else:
        x = torch.randn(shape, generator=generator)
    x = (x * 2.0 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    running_mean = torch.randn(c, generator=generator)
    running_var = torch.rand(c, generator=generator) + 0.5
    return x, running_mean, running_var


def bn_stat_digests() -> dict[str, str]:
    ops = torch.ops.delt_ext
    out = {}
    for seed, (shape, dtype, layout) in enumerate(
        (s, d, lay) for s in BN_SHAPES for d in DTYPES for lay in LAYOUTS
    ):
        x, running_mean, running_var = _bn_input(shape, dtype, layout, seed)
        x.requires_grad_(True)
        loss, mean, var, coef = ops.bn_stat_loss(x, running_mean, running_var)
        (grad,) = torch.autograd.grad(loss * 0.75, x)
        stats = ops.batch_mean_var(x)
        (grad_stats,) = torch.autograd.grad(stats[0].sum() + 2 * stats[1].sum(), x)
        key = f"bn/{shape}/{dtype}/{layout}"
        out[key] = _digest(loss, mean, var, coef, grad, *stats, grad_stats)
    return out


def crop_digests() -> dict[str, str]:
    from delt_ext import RandomResizedCropFlip

    out = {}
    cases = [
        ((4, 3, 32, 32), (24, 24), torch.float32, torch.contiguous_format, True),
        ((4, 3, 32, 32), (40, 36), torch.float32, torch.channels_last, True),
        ((3, 5, 17, 23), (16, 16), torch.float64, torch.contiguous_format, False),
        ((3, 8, 20, 20), (20, 20), torch.bfloat16, torch.channels_last, True),
        ((2, 3, 15, 9), (7, 30), torch.float16, torch.contiguous_format, True),
    ]
    for seed, (shape, size, dtype, memory_format, per_sample) in enumerate(cases):
        generator = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(shape, generator=generator).to(dtype)
        x = x.contiguous(memory_format=memory_format).requires_grad_(True)
        sampler = RandomResizedCropFlip(size, jitter=7, per_sample=per_sample, generator=generator)
        params = sampler.sample_params(shape[0], shape[2], shape[3])
        y = torch.ops.delt_ext.resized_crop_flip(x, params, *size)
        grad_out = torch.randn(y.shape, generator=generator).to(dtype)
        (grad,) = torch.autograd.grad(y, x, grad_out)
        key = f"crop/{shape}/{size}/{dtype}/{memory_format}/{per_sample}"
        out[key] = _digest(params, y, grad)
    return out


@pytest.mark.skipif(not _cpu_has_avx2_fma(), reason="digests were saved on an AVX2+FMA CPU")
@pytest.mark.parametrize("family", ["bn", "crop"])
def test_cpu_outputs_are_bitwise_unchanged(family):
    import delt_ext

    if not delt_ext.HAS_OPS:
        pytest.skip("compiled delt_ext library not built")
    saved = json.loads(DIGESTS.read_text())
    now = bn_stat_digests() if family == "bn" else crop_digests()
    expected = {k: v for k, v in saved.items() if k.startswith(family + "/")}
    assert set(now) == set(expected)
    changed = sorted(k for k in now if now[k] != expected[k])
    assert not changed, f"{len(changed)} CPU results changed, first: {changed[:5]}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_cpu_outputs_unchanged.py --write")
    import delt_ext  # noqa: F401

    torch.set_num_threads(1)
    DIGESTS.write_text(json.dumps({**bn_stat_digests(), **crop_digests()}, indent=1) + "\n")
    print(f"wrote {DIGESTS}")
