"""Datasets: one registry (``DATASETS``), each entry carrying its normalization, resolution and
class order (docs/pipeline.md): ``fashion-mnist``, ``cifar10``, ``cifar100``,
``imagefolder`` (an explicit, recorded class order; :func:`load_like` refuses a folder whose
classes differ from a model's) and ``synthetic:classes=4,size=8,...`` (options in the name).
Every dataset yields normalized float images (C, H, W) and int labels; :class:`DatasetInfo`
travels with teachers, selections and distilled sets.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from delt.config import check_int
from delt.io import read_image
from delt.runtime import check_memory

__all__ = [
    "DATASETS",
    "DataMismatchError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DatasetSpec",
    "FileListDataset",
    "FolderImageDataset",
    "ImageDataset",
    "TensorImageDataset",
    "load_dataset",
    "load_like",
    "same_dataset_name",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing; the message says how to get them."""


class DataMismatchError(ValueError):
    """Data (files, a set, a model) do not match the dataset description they are used with."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model trained on a dataset must agree with, and how to (de)normalize its pixels.

    Attributes:
        name: the registry name with its options (e.g. ``"fashion-mnist"``).
        num_classes: number of classes; labels are ``0 .. num_classes - 1``.
        channels, resolution: image shape ``(channels, resolution, resolution)``.
        mean, std: per-channel normalization, ``x_normalized = (x - mean) / std`` with x in [0, 1].
        class_names: class ``i``'s name; the order is the label order.
        class_subset: ``imagefolder`` only: the classes are a subset of the tree's class folders,
            chosen by ``--class-order`` (False: they are all of its folders).
    """

    name: str
    num_classes: int
    channels: int
    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    class_subset: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DatasetInfo:
        return cls(
            name=str(data["name"]),
            num_classes=int(data["num_classes"]),
            channels=int(data["channels"]),
            resolution=int(data["resolution"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            class_names=tuple(str(v) for v in data["class_names"]),
            class_subset=bool(data.get("class_subset", False)),
        )

    def _per_channel(self, values: tuple[float, ...], like: Tensor) -> Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def normalize(self, images: Tensor) -> Tensor:
        """[0, 1] images (..., C, H, W) → normalized space."""
        return (images - self._per_channel(self.mean, images)) / self._per_channel(self.std, images)

    def denormalize(self, images: Tensor) -> Tensor:
        """Normalized images (..., C, H, W) → [0, 1] space (not clamped)."""
        return images * self._per_channel(self.std, images) + self._per_channel(self.mean, images)

    def pixel_bounds(self) -> tuple[Tensor, Tensor]:
        """The valid range of each channel in normalized space, ``((0 - m) / s, (1 - m) / s)``.

        Returns two float32 tensors of shape (C, 1, 1), broadcastable against (N, C, H, W).
        """
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std


class ImageDataset(torch.utils.data.Dataset):
    """A labeled image dataset: normalized (C, H, W) float32 images and int labels.

    Attributes:
        info: the dataset's :class:`DatasetInfo`.
        targets: (N,) int64, the label of every image (read without loading any image).
    """

    info: DatasetInfo
    targets: Tensor

    def __len__(self) -> int:
        return int(self.targets.numel())

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def images(self, indices: Sequence[int] | Tensor) -> Tensor:
        """The normalized images at ``indices``, stacked: (n, C, H, W) float32."""
        return torch.stack([self[int(i)][0] for i in indices])

    def fingerprint(self) -> str:
        """``"sha256:<hex>"`` of this split's labels and a fixed sample of its images (computed
        once per dataset object): two splits of the same name and shape but other data differ.

        Teachers and selections record their training split's fingerprint;
        :func:`delt.models.check_compatible` compares it.
        """
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            digest = hashlib.sha256()
            digest.update(repr((len(self), self.info.channels, self.info.resolution)).encode())
            digest.update(self.targets.to(torch.int64).numpy().tobytes())
            self._fingerprint_sample(digest)
            cached = self._fingerprint = f"sha256:{digest.hexdigest()}"
        return cached

    def _fingerprint_sample(self, digest) -> None:
        for index in _sample_indices(len(self)):
            digest.update(self[index][0].numpy().tobytes())


class TensorImageDataset(ImageDataset):
    """A dataset held in memory as uint8 (N, C, H, W); normalized on access."""

    def __init__(self, info: DatasetInfo, pixels: Tensor, targets: Tensor) -> None:
        if pixels.dtype != torch.uint8 or pixels.dim() != 4:
            raise ValueError(
                f"pixels must be uint8 (N, C, H, W), got {pixels.dtype} {tuple(pixels.shape)}"
            )
        if targets.shape != (pixels.shape[0],):
            raise ValueError("targets must hold one label per image")
        self.info = info
        self.pixels = pixels
        self.targets = targets.to(torch.int64)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images([index])[0], int(self.targets[index])

    def _fingerprint_sample(self, digest) -> None:
        # The stored bytes, not a normalized float view: exact, whatever the normalization.
        digest.update(self.pixels[torch.tensor(_sample_indices(len(self)))].numpy().tobytes())

    def images(self, indices: Sequence[int] | Tensor) -> Tensor:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self.info.normalize(self.pixels[index].to(torch.float32).div_(255))


class FolderImageDataset(ImageDataset):
    """An ImageFolder tree read with PIL, in an explicit class order.

    Images get DELT's evaluation view, ``Resize(S // 7 * 8)`` then ``CenterCrop(S)``
    (DELT, github.com/VILA-Lab/DELT), then ``ToTensor`` and normalization.
    """

    def __init__(self, info: DatasetInfo, folder: Path) -> None:
        import torchvision
        from torchvision import transforms

        class_names = list(info.class_names)

        class _Ordered(torchvision.datasets.ImageFolder):
            def find_classes(self, directory):  # noqa: D401 - torchvision's hook
                return class_names, {name: i for i, name in enumerate(class_names)}

        size = info.resolution
        transform = transforms.Compose(
            [
                transforms.Resize(size // 7 * 8),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(info.mean, info.std),
            ]
        )
        self.info = info
        # read_image: torchvision's loader's pixels for 8-bit files; 16-bit ones scaled, not
        # clipped; an unreadable file named.
        self.folder = _Ordered(
            str(folder), transform=transform, loader=functools.partial(read_image, mode="RGB")
        )
        self.targets = torch.tensor(self.folder.targets, dtype=torch.int64)

    def _fingerprint_sample(self, digest) -> None:
        # The file list and the raw bytes of a sample of files: no decoding, so no dependence
        # on the image library's version.
        root = Path(self.folder.root)
        for path, label in self.folder.samples:
            digest.update(f"{Path(path).relative_to(root)}\t{label}\n".encode())
        for index in _sample_indices(len(self), 16):
            with open(self.folder.samples[index][0], "rb") as handle:
                digest.update(handle.read())

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.folder[index]
        if image.shape[0] != self.info.channels:
            image = image.expand(self.info.channels, -1, -1)  # grayscale files in an RGB set
        return image, int(label)


def _sample_indices(count: int, samples: int = 64) -> list[int]:
    """``samples`` indices spread evenly over ``range(count)`` (all of them when fewer)."""
    if count <= samples:
        return list(range(count))
    return [i * count // samples for i in range(samples)]


def same_dataset_name(first: str, second: str) -> bool:
    """Whether two dataset names (with options) name the same data: the options compared as a
    set, so ``synthetic:seed=0,classes=4`` is ``synthetic:classes=4,seed=0``."""
    try:
        return _parse_name(first) == _parse_name(second)
    except ValueError:
        return first == second


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: ``load(options, root, split, resolution, class_order)``."""

    name: str
    description: str
    load: Callable[..., ImageDataset]


def _parse_name(name: str) -> tuple[str, dict[str, str]]:
    base, _, option_text = name.partition(":")
    options: dict[str, str] = {}
    for item in filter(None, option_text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--dataset {name!r}: options must look like key=value, got {item!r}")
        if key.strip() in options:
            raise ValueError(f"--dataset {name!r}: option {key.strip()!r} is given twice")
        options[key.strip()] = value.strip()
    return base, options


def _no_options(name: str, options: dict[str, str]) -> None:
    if options:
        raise ValueError(f"--dataset {name} takes no options, got {sorted(options)}")


def _fixed_resolution(name: str, resolution: int | None, native: int) -> None:
    if resolution is not None and resolution != native:
        raise ValueError(
            f"--resolution {resolution}: {name} has a fixed resolution of {native}; "
            "--resolution applies to imagefolder and synthetic data"
        )


def _no_class_order(name: str, class_order: str | None) -> None:
    if class_order is not None:
        raise ValueError(
            f"--class-order applies to imagefolder only; {name} has a fixed class order"
        )


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def _read_idx(folder: Path, stem: str) -> np.ndarray:
    """Reads an IDX file (``stem`` or ``stem.gz``): magic, dims (big-endian int32), uint8 data."""
    for path, opener in ((folder / f"{stem}.gz", gzip.open), (folder / stem, open)):
        if path.is_file():
            with opener(path, "rb") as handle:
                data = handle.read()
            break
    else:
        raise DatasetNotFoundError(
            f"Fashion-MNIST: {stem}[.gz] not found in {folder}. Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (files go to "
            f"{FASHION_MNIST_ROOT}), or pass --data-root DIR holding the four IDX files "
            "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte, optionally .gz)."
        )
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{folder / stem}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_fashion_mnist(name, options, root, split, resolution, class_order) -> ImageDataset:
    _no_options(name, options)
    _fixed_resolution(name, resolution, 28)
    _no_class_order(name, class_order)
    folder = Path(root or FASHION_MNIST_ROOT)
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels = _read_idx(folder, f"{prefix}-labels-idx1-ubyte")
    info = DatasetInfo(
        name=name,
        num_classes=10,
        channels=1,
        resolution=28,
        # Mean and std of the 60,000 training images.
        mean=(0.2860,),
        std=(0.3530,),
        class_names=FASHION_MNIST_CLASSES,
    )
    pixels = torch.from_numpy(images.copy()).unsqueeze(1)
    return TensorImageDataset(info, pixels, torch.from_numpy(labels.astype(np.int64)))


def _cifar_loader(num_classes: int) -> Callable[..., ImageDataset]:
    folder_name = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    archive = "cifar-10-python.tar.gz" if num_classes == 10 else "cifar-100-python.tar.gz"

    def load(name, options, root, split, resolution, class_order) -> ImageDataset:
        import torchvision

        _no_options(name, options)
        _fixed_resolution(name, resolution, 32)
        _no_class_order(name, class_order)
        how = (
            f"download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
            f"into DIR so that DIR/{folder_name} exists, then pass --data-root DIR"
        )
        if root is None:
            raise DatasetNotFoundError(f"{name} needs --data-root: {how}")
        if not (Path(root) / folder_name).is_dir():
            raise DatasetNotFoundError(f"{name}: {Path(root) / folder_name} not found; {how}")
        cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
        try:
            data = cls(root, train=split == "train", download=False)
        except RuntimeError as error:  # torchvision's "not found or corrupted"
            raise DatasetNotFoundError(f"{name} in {root}: {error}; {how}") from error
        info = DatasetInfo(
            name=name,
            num_classes=num_classes,
            channels=3,
            resolution=32,
            # DELT recover.py's CIFAR constants (VILA-Lab/DELT), for CIFAR-10 and CIFAR-100.
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2023, 0.1994, 0.2010),
            class_names=tuple(data.classes),
        )
        pixels = torch.from_numpy(np.ascontiguousarray(data.data)).permute(0, 3, 1, 2).contiguous()
        return TensorImageDataset(info, pixels, torch.tensor(data.targets, dtype=torch.int64))

    return load


def _split_folder(root: str | None, split: str) -> Path:
    """``ROOT/train`` for the train split, ``ROOT/val`` (or ``ROOT/test``) for the test split."""
    if root is None:
        raise DatasetNotFoundError(
            "imagefolder needs --data-root DIR with DIR/train/<class>/* and DIR/val/<class>/* "
            "(for ImageNet, the usual train/val layout with one folder per WNID)"
        )
    split_names = ("train",) if split == "train" else ("val", "test")
    for split_name in split_names:
        folder = Path(root) / split_name
        if folder.is_dir():
            return folder
    raise DatasetNotFoundError(
        f"imagefolder: {Path(root) / split_names[0]} not found; --data-root must hold "
        f"{' or '.join(split_names)}/<class>/* image folders"
    )


def _class_folders(folder: Path) -> list[str]:
    """The class folders of ``folder``, sorted (torchvision ImageFolder's classes)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def shown_name(name: str) -> str:
    """A class or folder name as messages show it: its ``repr``, except that a name not in
    Unicode NFC form shows its non-ASCII characters escaped (``'cafe\\u0301'``), so that two
    names that differ only in normalization (NFC ``é`` vs NFD ``e`` + U+0301, e.g. folders
    copied from macOS) never look identical."""
    return repr(name) if unicodedata.is_normalized("NFC", name) else ascii(name)


def normalization_note(first: Sequence[str], second: Sequence[str]) -> str:
    """A note on the names of ``first`` that equal one of ``second`` only after Unicode NFC
    normalization (empty if none)."""
    normal = {unicodedata.normalize("NFC", name): name for name in second}
    for name in first:
        other = normal.get(unicodedata.normalize("NFC", name), name)
        if other != name:
            return (
                f"; {shown_name(name)} and {shown_name(other)} differ only in Unicode "
                "normalization (NFC vs NFD): rename one so that both are spelled alike"
            )
    return ""


def _shown(names: Sequence[str], limit: int = 5) -> str:
    listed = ", ".join(shown_name(name) for name in names[:limit])
    return f"[{listed}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def _load_imagefolder(name, options, root, split, resolution, class_order) -> ImageDataset:
    # class_order: a file path from --class-order, or a tuple of names (a teacher's recorded order).
    _no_options(name, options)
    folder = _split_folder(root, split)
    found = _class_folders(folder)
    if not found:
        raise DatasetNotFoundError(f"imagefolder: no class folder in {folder}")
    if class_order is None:
        # Sorted folder names: ImageFolder's convention, recorded so it is never re-guessed.
        class_names = found
    else:
        if isinstance(class_order, tuple):
            class_names, source = list(class_order), "the recorded class order"
        else:
            order_file = Path(class_order)
            if not order_file.is_file():
                raise DatasetNotFoundError(f"--class-order {class_order}: no such file")
            source = f"--class-order {class_order}"
            try:
                lines = order_file.read_bytes().decode("utf-8").splitlines()
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{source}: not a UTF-8 text file of class folder names (byte "
                    f"{error.start} is not UTF-8)"
                ) from None
            class_names = [line.strip() for line in lines if line.strip()]
            if not class_names:
                raise ValueError(
                    f"{source}: the file lists no class; expected class folder names of "
                    f"{folder}, one per line"
                )
        if len(set(class_names)) != len(class_names):
            twice = next(name for name in class_names if class_names.count(name) > 1)
            raise ValueError(f"{source}: class {shown_name(twice)} is listed twice")
        present = set(found)
        missing = [c for c in class_names if c not in present]
        if missing:
            raise DatasetNotFoundError(
                f"{source}: no folder in {folder} for {_shown(missing)}"
                f"{normalization_note(missing, found)}"
            )
    info = _imagenet_style_info(
        name, class_names, resolution or 224, class_subset=set(class_names) != set(found)
    )
    return FolderImageDataset(info, folder)


def _imagenet_style_info(
    name: str, class_names: list[str], resolution: int, class_subset: bool = False
) -> DatasetInfo:
    """An RGB dataset of named classes under ImageNet's normalization (torchvision's mean and
    std, which its pretrained weights assume): imagefolder and tiny-imagenet."""
    return DatasetInfo(
        name=name,
        num_classes=len(class_names),
        channels=3,
        resolution=resolution,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        class_names=tuple(class_names),
        class_subset=class_subset,
    )


class FileListDataset(ImageDataset):
    """Images read with PIL from a list of ``(path, label)``, converted to RGB, resized to the
    resolution only if they are not already that size, then ``ToTensor`` and normalization."""

    def __init__(self, info: DatasetInfo, samples: list[tuple[Path, int]]) -> None:
        self.info = info
        self.samples = samples
        self.targets = torch.tensor([label for _, label in samples], dtype=torch.int64)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from torchvision.transforms import functional

        path, label = self.samples[index]
        image = read_image(path, "RGB")  # 16-bit files scaled, unreadable ones named
        size = self.info.resolution
        if image.size != (size, size):
            image = functional.center_crop(functional.resize(image, size), size)
        tensor = functional.to_tensor(image)
        return functional.normalize(tensor, self.info.mean, self.info.std), label


TINY_IMAGENET_HOW = (
    "download tiny-imagenet-200.zip from http://cs231n.stanford.edu/tiny-imagenet-200.zip and "
    "unzip it, then pass --data-root DIR/tiny-imagenet-200 (it holds wnids.txt, "
    "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt)"
)


def _load_tiny_imagenet(name, options, root, split, resolution, class_order) -> ImageDataset:
    """Tiny-ImageNet-200 in its released layout; classes in sorted-WNID order (torchvision's
    ImageFolder order on ``train/``, what RDED's and SRe2L's teachers use), 64 px, ImageNet's
    mean/std; the test split is ``val/`` labelled by ``val_annotations.txt``."""
    _no_options(name, options)
    _no_class_order(name, class_order)
    if root is None:
        raise DatasetNotFoundError(f"{name} needs --data-root: {TINY_IMAGENET_HOW}")
    folder = Path(root)
    train = folder / "train"
    if not train.is_dir():
        raise DatasetNotFoundError(f"{name}: {train} not found; {TINY_IMAGENET_HOW}")
    wnids = _class_folders(train)
    if (folder / "wnids.txt").is_file():
        listed = sorted(filter(None, (line.strip() for line in (folder / "wnids.txt").open())))
        if listed != wnids:
            raise DataMismatchError(
                f"--data-root {root}: wnids.txt lists {len(listed)} classes, train/ holds "
                f"{len(wnids)} class folders, and they differ"
            )
    label_of = {wnid: index for index, wnid in enumerate(wnids)}
    if split == "train":
        samples = [
            (path, label_of[wnid])
            for wnid in wnids
            for path in sorted((train / wnid / "images").glob("*"))
            if path.suffix.lower() in (".jpeg", ".jpg", ".png")
        ]
    else:
        annotations = folder / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise DatasetNotFoundError(f"{name}: {annotations} not found; {TINY_IMAGENET_HOW}")
        samples = []
        for number, line in enumerate(annotations.read_text().splitlines(), start=1):
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            if fields[1] not in label_of:
                raise DataMismatchError(
                    f"{annotations}:{number}: class {fields[1]!r} is not a train/ class folder"
                )
            samples.append((folder / "val" / "images" / fields[0], label_of[fields[1]]))
        samples.sort(key=lambda sample: (sample[1], sample[0].name))
    if not samples:
        raise DatasetNotFoundError(f"{name}: no {split} image under {folder}; {TINY_IMAGENET_HOW}")
    return FileListDataset(_imagenet_style_info(name, wnids, resolution or 64), samples)


_SYNTHETIC_DEFAULTS = {"classes": 10, "channels": 3, "size": 16, "train": 32, "test": 8, "seed": 0}


def _load_synthetic(name, options, root, split, resolution, class_order) -> ImageDataset:
    _no_class_order(name, class_order)
    if root is not None:
        raise ValueError("--data-root does not apply to synthetic data (it is generated)")
    unknown = sorted(set(options) - set(_SYNTHETIC_DEFAULTS))
    if unknown:
        raise ValueError(
            f"--dataset {name}: unknown option(s) {unknown}; known: {sorted(_SYNTHETIC_DEFAULTS)}"
        )
    values = dict(_SYNTHETIC_DEFAULTS)
    for key, text in options.items():
        try:
            values[key] = int(text)
        except ValueError:
            raise ValueError(
                f"--dataset {name}: option {key} must be an integer, got {text!r}"
            ) from None
    if resolution is not None:
        values["size"] = resolution
    if not 0 <= values["seed"] <= 2**62:  # the test split's generator takes 2 * seed + 2
        raise ValueError(f"--dataset {name}: option seed must be in 0..2**62, got {values['seed']}")
    for key in ("classes", "channels", "size", "train", "test"):
        check_int(f"--dataset {name}: option {key}", values[key])
    classes, channels, size = values["classes"], values["channels"], values["size"]
    per_class = values["train"] if split == "train" else values["test"]
    count = classes * per_class
    # Float patterns and noise, their float mix and the uint8 result, all at once.
    check_memory(
        f"--dataset {name}"
        + (f" --resolution {resolution}" if resolution else "")
        + f": {count:,} {split} images of {channels}x{size}x{size}",
        (classes + 2 * count) * channels * size * size * 4 + count * channels * size * size,
    )
    generator = torch.Generator().manual_seed(values["seed"])
    # Class c's images are a fixed random low-frequency pattern plus noise: random, yet
    # learnable, so teachers, selection and recovery all have something to work on.
    patterns = torch.rand(classes, channels, 4, 4, generator=generator)
    patterns = torch.nn.functional.interpolate(patterns, size=(size, size), mode="bilinear")
    split_generator = torch.Generator().manual_seed(values["seed"] * 2 + (split != "train") + 1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    noise = torch.rand(labels.numel(), channels, size, size, generator=split_generator)
    pixels = (0.6 * patterns[labels] + 0.4 * noise).mul(255).round().to(torch.uint8)
    info = DatasetInfo(
        name=name,
        num_classes=classes,
        channels=channels,
        resolution=size,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        class_names=tuple(f"class{c}" for c in range(classes)),
    )
    return TensorImageDataset(info, pixels, labels)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "fashion-mnist", "Fashion-MNIST, 10 classes, 1x28x28 (IDX files)", _load_fashion_mnist
        ),
        DatasetSpec("cifar10", "CIFAR-10, 10 classes, 3x32x32 (python folder)", _cifar_loader(10)),
        DatasetSpec(
            "cifar100", "CIFAR-100, 100 classes, 3x32x32 (python folder)", _cifar_loader(100)
        ),
        DatasetSpec(
            "imagefolder",
            "ROOT/{train,val}/<class>/* trees, explicit class order",
            _load_imagefolder,
        ),
        DatasetSpec(
            "tiny-imagenet",
            "Tiny-ImageNet-200 (released layout), 200 classes, 3x64x64, sorted WNIDs",
            _load_tiny_imagenet,
        ),
        DatasetSpec(
            "synthetic", "random class-dependent images for tests and benchmarks", _load_synthetic
        ),
    )
}


def load_like(info: DatasetInfo, split: str = "train", root: str | None = None) -> ImageDataset:
    """Loads the dataset ``info`` describes (e.g. a teacher's), in ``info``'s class order.

    The class order and resolution come from ``info``, never re-derived from the files; a
    fixed dataset whose files disagree is refused later by ``models.check_compatible``.

    For ``imagefolder`` the folder must hold a class folder for each of ``info.class_names``,
    and, unless the teacher was trained on a ``--class-order`` subset (``info.class_subset``), no
    other: a class the teacher does not know would be silently left out of the data, and a
    missing one would leave a teacher class without images. The labels follow ``info``'s
    recorded order (the one the teacher was trained with), whatever order the folder names sort
    in.

    Raises:
        DataMismatchError: the ``imagefolder`` classes differ from ``info``'s (the message
            names the folder and the extra and missing classes).
        DatasetNotFoundError, ValueError: as :func:`load_dataset`.
    """
    base, _ = _parse_name(info.name)
    if base == "imagefolder":
        _check_folder_classes(info, split, root)
    return load_dataset(
        info.name,
        split,
        root,
        resolution=info.resolution,
        class_order=info.class_names if base == "imagefolder" else None,
    )


def _check_folder_classes(info: DatasetInfo, split: str, root: str | None) -> None:
    if split not in ("train", "test"):
        return  # load_dataset refuses it
    folder = _split_folder(root, split)
    found = _class_folders(folder)
    if not found:
        return  # load_dataset says there is no class folder
    known, present = set(info.class_names), set(found)
    # A teacher of a --class-order subset ignores the other folders by design.
    unknown = [] if info.class_subset else [c for c in found if c not in known]
    missing = [c for c in info.class_names if c not in present]
    if unknown or missing:
        raise DataMismatchError(
            f"--data-root {root}: the class folders of {folder} are not the "
            f"{info.num_classes} classes the teacher was trained on ({len(found)} folders; "
            f"not known to the teacher: {_shown(unknown) if unknown else 'none'}; missing: "
            f"{_shown(missing) if missing else 'none'}{normalization_note(unknown, missing)}); "
            "pass the --data-root the teacher was trained on, or train a teacher on this folder"
        )


def load_dataset(
    name: str,
    split: str = "train",
    root: str | None = None,
    resolution: int | None = None,
    class_order: str | tuple[str, ...] | None = None,
) -> ImageDataset:
    """Loads a registered dataset.

    Args:
        name: a ``DATASETS`` key, optionally with options (``synthetic:classes=4,size=8``).
        split: ``"train"`` or ``"test"``.
        root: where its files are (``--data-root``); ``None`` for the dataset's default.
        resolution: image size for ``imagefolder`` (default 224) and ``synthetic``.
        class_order: for ``imagefolder``, a file of class folder names, one per line, or the
            names themselves as a tuple: each name once, each a class folder of the split (a
            subset of the folders is a dataset of those classes). ``None``: all the folders,
            sorted.

    Raises:
        ValueError: unknown name, bad option or argument.
        DatasetNotFoundError: the files are missing (the message says how to get them).
    """
    base, options = _parse_name(name)
    if base not in DATASETS:
        raise ValueError(f"--dataset {name!r}: unknown dataset; known: {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if resolution is not None:
        check_int("--resolution", resolution)
    return DATASETS[base].load(name, options, root, split, resolution, class_order)
