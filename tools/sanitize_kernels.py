"""Calls every compiled kernel of delt_ext forward and backward, in every dtype and layout.

For compute-sanitizer (``make gpu-check`` runs it under ``--tool memcheck``, ``racecheck`` and
``synccheck``; docs/gpu-check.md), so the sizes are small but reach every code path of the
kernels: a plane split over several blocks (H*W > 4096) with a partial piece, one value per
channel, channel counts that are not multiples of the vector widths, more than 1024 channels,
the non-finite recomputation of the BN statistics (NaN, Inf, 1e37), and the crop op per image
and batch-shared, flipped and rolled, downscaled and upscaled. Each result is also compared with
the CPU kernels (the same tolerances as the tests), so a kernel that runs clean but computes
garbage fails here too.

    python tools/sanitize_kernels.py --device cuda      # exit 0: every case ran and matched
    python tools/sanitize_kernels.py --device cpu       # the same calls on the CPU (a dry run)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import delt_ext
from delt_ext import resized_crop_flip

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BN_LAYOUTS = ("nchw", "channels_last", "strided")
CROP_LAYOUTS = ("nchw", "channels_last", "strided")
# (N, C, H, W): the cases of the docstring above.
BN_SHAPES = ((2, 3, 65, 70), (3, 5, 8, 8), (1, 6, 1, 1), (4, 37, 5, 5), (2, 1030, 2, 2))
# Relative tolerance against the CPU kernels, by dtype: twice the tests' GRAD_RTOL (each side is
# within it of the exact value), and more for the value rounding of 16-bit outputs.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_input(shape, dtype, layout, generator) -> torch.Tensor:
    """A CPU tensor of ``shape`` in ``layout`` (strided: every other column of a wider one)."""
    n, c, h, w = shape
    if layout == "strided":
        x = torch.randn(n, c, h, 2 * w, generator=generator)[..., ::2]
    else:
        x = torch.randn(shape, generator=generator)
    x = (2 * x + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def close(result: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Max-norm relative error within the dtype's tolerance; NaN where expected, nowhere else."""
    a, b = result.detach().cpu().double(), expected.detach().cpu().double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return False
    finite = torch.isfinite(b)
    if not torch.equal(a[~finite & ~torch.isnan(b)], b[~finite & ~torch.isnan(b)]):
        return False
    a, b = a[finite], b[finite]
    if b.numel() == 0:
        return True
    scale = b.abs().max().clamp_min(1e-30)
    return bool(((a - b).abs().max() / scale) <= TOLERANCE[dtype])


def bn_case(x_cpu, device, dtype) -> list[str]:
    """The loss (forward, and backward of the loss alone: the fused path), the loss with its
    statistics also used (the general backward), and batch_mean_var with its backward."""
    failures = []
    channels = x_cpu.shape[1]
    generator = torch.Generator().manual_seed(channels)
    running_mean = torch.randn(channels, generator=generator)
    running_var = torch.rand(channels, generator=generator) + 0.5

    def run(where):
        x = x_cpu.to(where).requires_grad_(True)
        mean_target, var_target = running_mean.to(where), running_var.to(where)
        loss = delt_ext.bn_stat_loss(x, mean_target, var_target)
        (grad_loss,) = torch.autograd.grad(loss, x)
        mean, var = delt_ext.batch_mean_var(x)
        (grad_stats,) = torch.autograd.grad(mean.sum() + 0.5 * var.sum(), x)
        outputs = torch.ops.delt_ext.bn_stat_loss(x, mean_target, var_target)
        combined = outputs[0] + outputs[1].sum() + outputs[2].sum()
        (grad_combined,) = torch.autograd.grad(combined, x)
        return loss, grad_loss, mean, var, grad_stats, grad_combined

    names = ("loss", "grad of loss", "mean", "var", "grad of mean/var", "grad of loss+stats")
    for name, got, expected in zip(names, run(device), run("cpu"), strict=True):
        if got.stride() != expected.stride() or not close(got, expected, dtype):
            failures.append(name)
    return failures


def crop_case(x_cpu, device, dtype, per_sample: bool, out_size) -> list[str]:
    n, _, h, w = x_cpu.shape
    generator = torch.Generator().manual_seed(n * 31 + h)
    rows = []
    for _ in range(n if per_sample else 1):
        height = int(torch.randint(1, h + 1, (1,), generator=generator))
        width = int(torch.randint(1, w + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - height + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - width + 1, (1,), generator=generator))
        flip = int(torch.randint(0, 2, (1,), generator=generator))
        shift_y, shift_x = (int(v) for v in torch.randint(-3, 4, (2,), generator=generator))
        rows.append([top, left, height, width, flip, shift_y, shift_x])
    params = torch.tensor(rows, dtype=torch.float64)
    grad_out = torch.randn(n, x_cpu.shape[1], *out_size, generator=generator).to(dtype)

    def run(where):
        x = x_cpu.to(where).requires_grad_(True)
        out = resized_crop_flip(x, params.to(where), out_size)
        (grad,) = torch.autograd.grad(out, x, grad_out.to(where))
        return out, grad

    failures = []
    for name, got, expected in zip(("out", "grad"), run(device), run("cpu"), strict=True):
        if got.stride() != expected.stride() or not close(got, expected, dtype):
            failures.append(name)
    return failures


def nonfinite_inputs(dtype, generator) -> list[tuple[str, torch.Tensor]]:
    """Inputs that take the kernels' exact float64 recomputation of a channel's statistics."""
    base = make_input((3, 4, 9, 7), dtype, "nchw", generator)
    cases = []
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("1e37", 1e37)):
        if name == "1e37" and dtype in (torch.float16, torch.bfloat16):
            continue  # not representable in float16; bfloat16 rounds it into another case
        x = base.clone()
        x[0, 1, 0, 0] = value
        cases.append((name, x))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    args = parser.parse_args(argv)
    if not delt_ext.HAS_OPS:
        print("sanitize_kernels: the compiled delt_ext library is not loaded", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not delt_ext.build_info().cuda_kernels:
        print("sanitize_kernels: this delt_ext build has no CUDA kernels", file=sys.stderr)
        return 2
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    failures: list[str] = []
    cases = 0
    for dtype in DTYPES:
        for layout in BN_LAYOUTS:
            for shape in BN_SHAPES:
                cases += 1
                failed = bn_case(make_input(shape, dtype, layout, generator), device, dtype)
                failures += [f"bn_stat {shape} {dtype} {layout}: {name}" for name in failed]
        for name, x in nonfinite_inputs(dtype, generator):
            cases += 1
            failed = bn_case(x, device, dtype)
            failures += [f"bn_stat non-finite {name} {dtype}: {what}" for what in failed]
        for layout in CROP_LAYOUTS:
            for per_sample in (True, False):
                for out_size in ((24, 20), (5, 7)):  # upscale and downscale of 17 x 13
                    cases += 1
                    x = make_input((3, 2, 17, 13), dtype, layout, generator)
                    failed = crop_case(x, device, dtype, per_sample, out_size)
                    failures += [
                        f"resized_crop_flip {dtype} {layout} per_sample={per_sample} "
                        f"{out_size}: {name}"
                        for name in failed
                    ]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for failure in failures:
        print(f"MISMATCH {failure}")
    print(
        f"sanitize_kernels: {cases} cases on {device} in {seconds:.1f} s, "
        f"{len(failures)} mismatches against the CPU kernels"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
