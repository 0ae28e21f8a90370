"""CPU cost per image of the ImageNet data paths: decoding, resizing, the student's augmentation.

The README's "ImageNet-1K in 7 commands" projects how many DataLoader workers keep a GPU fed from
these rates (CPU seconds per image, one thread, so the figure does not depend on the load of the
rest of the machine as much as wall time does):

* ``val``: what ``delt select``, ``delt teacher --measure`` and the evaluator's test pass do to a
  JPEG: decode, resize the short side to 256, center-crop 224;
* ``train``: decode and RandomResizedCrop 224 + flip (a teacher's training read);
* ``student``: the evaluator's per-image augmentation of a stored 224 px uint8 image: crop, flip,
  RandAugment (2 ops, magnitude 6, delt eval's defaults);

and the file size of one 224 px image as ``delt recover`` writes it (JPEG quality 75 or PNG).

The JPEG is a generated 500x375 "photo-like" image (smooth gradients plus noise, quality 90),
about ImageNet's mean size; real photos decode at a similar rate per pixel.

    .venv/bin/python benchmarks/imagenet_cpu_rates.py
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms


def _photo(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500]
    base = np.stack([(x * 0.5 + y * 0.2) % 256, (y * 0.6) % 256, (x * 0.3 + 80) % 256], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _cpu_ms(function, count: int) -> float:
    function()  # warm-up
    start = time.process_time()
    for _ in range(count):
        function()
    return (time.process_time() - start) / count * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="images timed per path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pixels = _photo()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    val = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()]
    )
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )
    student = transforms.Compose(
        [
            transforms.RandomResizedCrop(224, antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.RandAugment(num_ops=2, magnitude=6),
        ]
    )
    stored = torch.from_numpy(pixels[:224, :224].copy()).permute(2, 0, 1).contiguous()
    rows = {
        "val: decode, resize 256, center-crop 224": lambda: val(
            Image.open(io.BytesIO(data)).convert("RGB")
        ),
        "train: decode, RandomResizedCrop 224, flip": lambda: train(
            Image.open(io.BytesIO(data)).convert("RGB")
        ),
        "student: crop, flip, RandAugment(2, 6) of 3x224x224 uint8": lambda: student(stored),
    }
    print(f"JPEG 500x375, {len(data) / 1e3:.0f} kB; one thread; {args.images} images per row")
    # The size of one 224 px image file as delt recover writes it (--image-format jpeg: quality
    # 75; png: lossless): uniform noise is the worst case, the photo-like image a typical one.
    noise = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    for name, image in (("uniform noise", noise), ("photo-like", pixels[:224, :224])):
        sizes = []
        for image_format, options in (("JPEG", {"quality": 75}), ("PNG", {})):
            encoded = io.BytesIO()
            Image.fromarray(image).save(encoded, image_format, **options)
            sizes.append(f"{image_format} {len(encoded.getvalue()) / 1e3:.0f} kB")
        print(f"224 px {name}: {', '.join(sizes)}")
    print("| path | CPU-ms / image | images / s per worker |")
    print("|---|---:|---:|")
    for name, function in rows.items():
        ms = _cpu_ms(function, args.images)
        print(f"| {name} | {ms:.2f} | {1e3 / ms:.0f} |")


if __name__ == "__main__":
    main()
