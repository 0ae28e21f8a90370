"""Issue 32 item 3: do K ConvNet-3 w64 students packed into one network (grouped convolutions,
each student its own BatchNorm channels and classifier; Packed-Ensembles, Laurent et al., ICLR
2023) step faster than K students one after the other? Student forward + backward + AdamW on
batches of 50 28x28 1-channel images (each student its own batch), one thread, interleaved.

Usage: OMP_NUM_THREADS=1 python benchmarks/eval/packed_students.py [K] [REPEATS]
"""

import sys
import time

import torch
from torch import nn


def convnet3(k: int, width: int = 64, classes: int = 10) -> nn.Module:
    layers, channels = [], 1
    for _ in range(3):
        layers += [nn.Conv2d(k * channels, k * width, 3, padding=1, groups=k),
                   nn.BatchNorm2d(k * width), nn.ReLU(inplace=True), nn.AvgPool2d(2)]  # fmt: skip
        channels = width
    # The classifier of each student: a grouped 1x1 convolution over its 64*3*3 features.
    head = nn.Conv1d(k * width * 9, k * classes, 1, groups=k)
    return nn.Sequential(
        *layers, nn.Flatten(1), nn.Unflatten(1, (k * width * 9, 1)), head, nn.Flatten(1)
    )


def timed(models: list[nn.Module], k_in: int, steps: int = 20) -> float:
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    batch = torch.randn(50, k_in, 28, 28)
    start = time.perf_counter()
    for _ in range(steps):
        for model, optimizer in zip(models, optimizers, strict=True):
            loss = model(batch).logsumexp(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    torch.set_num_threads(1)
    k = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    packed, sequential = convnet3(k), [convnet3(1) for _ in range(k)]
    # The packed network has the parameters of K students, not more.
    assert sum(p.numel() for p in packed.parameters()) == k * sum(
        p.numel() for p in sequential[0].parameters()
    )
    times = {"sequential": [], "packed": []}
    timed(sequential, 1, 3), timed([packed], k, 3)  # warm-up
    for _ in range(repeats):
        times["sequential"].append(timed(sequential, 1))
        times["packed"].append(timed([packed], k))
    best = {name: min(values) for name, values in times.items()}
    ratio = best["sequential"] / best["packed"]
    print(f"K={k}: {k} sequential students {1e3 * best['sequential']:.1f} ms per step of all, "
          f"packed {1e3 * best['packed']:.1f} ms: packed is {ratio:.2f}x "
          f"(min of {repeats} interleaved runs)")  # fmt: skip


if __name__ == "__main__":
    main()
