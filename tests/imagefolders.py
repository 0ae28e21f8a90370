"""Test helper: ImageFolder trees of small generated JPEG/PNG images."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder, count, size, seed, suffix="jpg", name="{k:03d}"):
    """Writes ``count`` random RGB images of ``size`` px into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        base = rng.integers(0, 256, (1, 1, 3))
        noise = rng.integers(-40, 41, (size, size, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = folder / f"{name.format(k=k)}.{suffix}"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def write_image_folder(root, classes, train, val, size):
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``; returns ``root``."""
    root = Path(root)
    for index, name in enumerate(classes):
        write_images(root / "train" / name, train, size, seed=2 * index)
        write_images(root / "val" / name, val, size, seed=2 * index + 1)
    return root


def write_tiny_imagenet(root, wnids, train, val, size=64):
    """Tiny-ImageNet's released layout: ``wnids.txt``, ``train/<wnid>/images/<wnid>_<k>.JPEG``,
    ``val/images/val_<i>.JPEG`` and ``val/val_annotations.txt`` (tab-separated, with boxes)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    lines = []
    number = 0
    for index, wnid in enumerate(wnids):
        write_images(
            root / "train" / wnid / "images", train, size, 3 * index, "JPEG", name=f"{wnid}_{{k}}"
        )
        for path in write_images(
            root / "val" / "images", val, size, 3 * index + 1, "JPEG", name=f"val_{number}_{{k}}"
        ):
            lines.append(f"{path.name}\t{wnid}\t0\t0\t{size - 1}\t{size - 1}\n")
        number += 1
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    return root
