"""Forward + backward of the augmentation step: fused vs grid_sample vs torchvision (issue 3).

Per shape (one benchmark group each, so the table compares them side by side):
  fused_per_sample        delt_ext's op, one box + flip per image
  fused_batch_shared      delt_ext's op, one params row for the batch (for reference)
  grid_sample_per_sample  affine_grid + grid_sample, one affine per image (kornia/DSA style)
  torchvision_batch_shared  v2 resized_crop(antialias=False) + hflip + roll on the batch tensor,
                          one box per call (SRe2L/CDA/DELT).
The batch-shared methods take the next box of the per-sample draw at every round, so all methods
see the same box distribution.
Params are drawn once, outside the timing, with DELT's sampler settings (scale (0.08, 1), flip
0.5, jitter 0; so no roll for grid_sample, which cannot express it). Each round runs the forward
and torch.autograd.grad of it w.r.t. x (no .grad accumulation).

Run: pytest benchmarks/bench_augment.py --benchmark-only  (or `make bench`).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

import delt_ext

CPU_SHAPES = [(100, 1, 28, 28), (100, 3, 32, 32)]
CUDA_SHAPES = [(100, 3, 224, 224)]
CASES = [(shape, "cpu") for shape in CPU_SHAPES] + [(shape, "cuda") for shape in CUDA_SHAPES]
METHODS = [
    "fused_per_sample",
    "fused_batch_shared",
    "grid_sample_per_sample",
    "torchvision_batch_shared",
]

pytestmark = pytest.mark.skipif(not delt_ext.HAS_OPS, reason="compiled delt_ext library not built")


def affine_from_params(params, height, width):
    """(N, 2, 3) affine_grid thetas (align_corners=False) of the crop boxes and flips."""
    top, left, box_h, box_w, flip = params[:, :5].double().unbind(1)
    sign = 1 - 2 * flip
    theta = torch.zeros(params.shape[0], 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = sign * box_w / width
    theta[:, 0, 2] = (2 * left + box_w) / width - 1
    theta[:, 1, 1] = box_h / height
    theta[:, 1, 2] = (2 * top + box_h) / height - 1
    return theta


def make_step(method, shape, device):
    n, c, height, width = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device).requires_grad_()
    grad = torch.randn(shape, generator=generator).to(device)
    sampler = delt_ext.RandomResizedCropFlip((height, width), generator=generator)
    params = sampler.sample_params(n, height, width)
    size = (height, width)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if method == "fused_per_sample":
        rows = params.to(device)

        def forward():
            # What RandomResizedCropFlip.forward runs: the op without the host-side value check.
            return torch.ops.delt_ext.resized_crop_flip(x, rows, height, width)

    elif method == "fused_batch_shared":
        shared_rows = itertools.cycle([params[k : k + 1].to(device) for k in range(n)])

        def forward():
            return torch.ops.delt_ext.resized_crop_flip(x, next(shared_rows), height, width)

    elif method == "grid_sample_per_sample":
        theta = affine_from_params(params, height, width).to(device=device, dtype=x.dtype)

        def forward():
            grid = F.affine_grid(theta, [n, c, height, width], align_corners=False)
            return F.grid_sample(
                x, grid, mode="bilinear", padding_mode="border", align_corners=False
            )

    else:
        boxes = itertools.cycle([[int(v) for v in row] for row in params.tolist()])

        def forward():
            top, left, box_h, box_w, flip, shift_y, shift_x = next(boxes)
            out = TF.resized_crop(x, top, left, box_h, box_w, list(size), antialias=False)
            if flip:
                out = TF.hflip(out)
            return torch.roll(out, shifts=(shift_y, shift_x), dims=(2, 3))

    def step():
        (g,) = torch.autograd.grad(forward(), x, grad)
        sync()
        return g

    return step


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape, device", CASES, ids=[f"{device}-{'x'.join(map(str, s))}" for s, device in CASES]
)
def test_augment_forward_backward(benchmark, shape, device, method):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    benchmark.group = f"augment fwd+bwd {device} {tuple(shape)}"
    step = make_step(method, shape, device)
    step()  # warm-up (allocator, first-call dispatch)
    benchmark.pedantic(step, rounds=200 if device == "cpu" else 100, warmup_rounds=5)
