"""The distilled-set format: ``DIR/distilled.pt``, ``DIR/manifest.json``, ``DIR/images/``.

``distilled.pt`` holds ``{"images": (N, C, H, W), "labels": (N,) int64}``, class-major. The
images are stored as float32, normalized (synthesized sets), or as uint8 pixels 0..255
(imported sets, ``images_dtype: "uint8"`` in the manifest, format version 3): a quarter of the
bytes, normalized batch by batch when used (:func:`normalized`). ``manifest.json`` is a
:class:`Manifest`; every writer and reader of a set goes through it. The manifest records the
SHA-256 of ``distilled.pt`` (``distilled_sha256``), checked at every load; a set written before
the digest existed still loads. Older manifests (no
``format_version``, ``wall_seconds`` for ``synthesis_seconds``) still load.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from delt.data import DataMismatchError, DatasetInfo
from delt.io import (
    FileFormatError,
    IntegrityError,
    read_json,
    save_image,
    sha256_file,
    torch_load,
    torch_save,
    write_json,
)

__all__ = [
    "MANIFEST_FORMAT_VERSION",
    "MANIFEST_KIND",
    "READ_FORMAT_VERSION",
    "Manifest",
    "check_distilled_set",
    "first_non_finite",
    "load_distilled",
    "load_stored",
    "normalized",
    "load_stage_unions",
    "save_distilled",
    "save_images",
    "union_prefix",
    "verify_distilled",
]

MANIFEST_KIND = "delt-distilled-set"
# 1: main up to e216f25 (no version field, ``wall_seconds``); 2: ``synthesis_seconds``;
# 3: ``images_dtype`` (only uint8 sets are written as version 3, so float sets stay readable by
# older versions, and an older version refuses a uint8 set instead of misreading its pixels).
MANIFEST_FORMAT_VERSION = 2
READ_FORMAT_VERSION = 3
IMAGES_DTYPES = ("float32", "uint8")


@dataclass
class Manifest:
    """What a distilled set is and how it was made (``manifest.json``).

    Attributes:
        method: ``sre2l``, ``cda``, ``delt``, ``pdd``, ``random-real``, ...
        ipc: images per class of this set (a pdd stage's union: its own IPC).
        dataset: the dataset the images belong to.
        teacher: ``{"path", "sha256", "meta"}`` of the teacher that made (or drew) the set.
        config: the resolved config of the command that wrote it.
        num_images: N.
        iterations_per_image: N optimization steps per image (0 for real images).
        synthesis_seconds: the chunks' optimization seconds, summed (not wall time).
        selection: ``{"path", "strategy"}`` of a real-image init, else None.
        files: relative paths of ``distilled`` and ``images``.
        indices: random-real: the training-set indices drawn.
        stage, stages, stage_per_image: pdd: the last stage k of this union, one entry per
            stage, and each image's stage.
        distilled_sha256: the SHA-256 of ``distilled.pt`` (None: written before it existed).
        images_dtype: how ``distilled.pt`` stores the images: ``"float32"`` (normalized) or
            ``"uint8"`` (pixels 0..255).
        extra: keys this version does not know (kept on a round trip).
    """

    method: str
    ipc: int
    dataset: DatasetInfo
    teacher: dict[str, Any]
    config: dict[str, Any]
    num_images: int
    iterations_per_image: list[int]
    synthesis_seconds: float
    seed: int | None = None
    selection: dict[str, Any] | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    indices: list[int] | None = None
    stage: int | None = None
    stages: list[dict[str, Any]] | None = None
    stage_per_image: list[int] | None = None
    distilled_sha256: str | None = None
    format_version: int = MANIFEST_FORMAT_VERSION
    images_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_iterations(self) -> int:
        return int(sum(self.iterations_per_image))

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"kind": MANIFEST_KIND}
        for name, value in dataclasses.asdict(self).items():
            if name != "extra" and not (value is None and name in _OPTIONAL):
                document[name] = self.dataset.to_dict() if name == "dataset" else value
        if self.images_dtype == "float32":
            del document["images_dtype"]  # the manifests of float sets stay as they were
        else:
            document["format_version"] = READ_FORMAT_VERSION
        document["image_iterations"] = self.image_iterations
        return {**self.extra, **document}

    @classmethod
    def from_dict(cls, document: dict[str, Any], where: str = "manifest") -> Manifest:
        """Reads any version; a version-1 ``wall_seconds`` becomes ``synthesis_seconds``."""
        document = dict(document)
        if document.pop("kind", None) != MANIFEST_KIND:
            raise ValueError(f"{where}: not a delt distilled-set manifest (kind {MANIFEST_KIND})")
        version = document.pop("format_version", 1)
        if not isinstance(version, int) or not 1 <= version <= READ_FORMAT_VERSION:
            raise ValueError(
                f"{where}: format_version {version!r} is not one this delt reads "
                f"(1..{READ_FORMAT_VERSION}); upgrade delt"
            )
        if version == 1 and "wall_seconds" in document:
            document["synthesis_seconds"] = document.pop("wall_seconds")
        document.pop("image_iterations", None)  # derived from iterations_per_image
        fields = [f for f in dataclasses.fields(cls) if f.name not in ("extra", "format_version")]
        missing = [f.name for f in fields if f.name not in document and f.init and _required(f)]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        known = {f.name: document.pop(f.name) for f in fields if f.name in document}
        known["dataset"] = DatasetInfo.from_dict(known["dataset"])
        manifest = cls(**known, extra=document)
        manifest.check(where)
        manifest.check_teacher_record(where)
        return manifest

    def check_teacher_record(self, where: str = "manifest") -> None:
        """Refuses a manifest whose dataset contradicts the teacher it records (``teacher.meta``
        holds the teacher's own dataset): it was edited or is corrupt, and a command that
        compared it with the teacher would blame the teacher.

        Raises:
            ValueError: naming ``where`` and the first difference.
        """
        meta = self.teacher.get("meta") if isinstance(self.teacher, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("dataset"), dict):
            return  # no record to compare with
        try:
            recorded = DatasetInfo.from_dict(meta["dataset"])
        except (KeyError, TypeError, ValueError):
            return
        mine = self.dataset
        if recorded.num_classes != mine.num_classes:
            what = (
                f"has {mine.num_classes} classes, but the teacher it records was trained on "
                f"{recorded.num_classes}"
            )
        elif recorded.class_names != mine.class_names:
            what = "lists other class names than the teacher it records"
        elif (recorded.channels, recorded.resolution) != (mine.channels, mine.resolution):
            what = (
                f"has {mine.channels}x{mine.resolution}x{mine.resolution} images, but the "
                f"teacher it records takes {recorded.channels}x{recorded.resolution}x"
                f"{recorded.resolution}"
            )
        else:
            return
        raise ValueError(
            f"{where}: its dataset {what} (teacher.meta.dataset): the manifest contradicts "
            "itself; it is corrupt or was edited (re-run the command that made the set)"
        )

    def check(self, where: str = "manifest") -> None:
        """Raises ValueError (naming ``where``) where the fields contradict each other."""
        if isinstance(self.ipc, bool) or not isinstance(self.ipc, int) or self.ipc < 1:
            raise ValueError(f"{where}: ipc must be an integer >= 1, got {self.ipc!r}")
        if len(self.iterations_per_image) != self.num_images:
            raise ValueError(
                f"{where}: {len(self.iterations_per_image)} iterations_per_image entries for "
                f"{self.num_images} images"
            )
        if self.stage_per_image is not None and len(self.stage_per_image) != self.num_images:
            raise ValueError(f"{where}: one stage_per_image entry per image expected")
        if self.images_dtype not in IMAGES_DTYPES:
            raise ValueError(
                f"{where}: images_dtype must be one of {IMAGES_DTYPES}, got {self.images_dtype!r}"
            )

    def save(self, folder: str | Path) -> None:
        """Writes ``folder/manifest.json`` (atomically)."""
        self.check(str(folder))
        write_json(Path(folder) / "manifest.json", self.to_dict())

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """Reads ``folder/manifest.json``.

        Raises:
            FileNotFoundError: there is none.
            ValueError: it is not a manifest this version reads.
        """
        path = Path(folder) / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"--distilled {folder}: no manifest.json")
        document = read_json(path, "manifest (manifest.json of `delt recover`)")
        try:
            return cls.from_dict(document, str(path))
        except (KeyError, TypeError, AttributeError) as error:
            raise FileFormatError(
                f"{path}: not a manifest this version reads ({type(error).__name__}: {error})"
            ) from None


# Left out of the JSON when None.
_OPTIONAL = ("indices", "stage", "stages", "stage_per_image", "distilled_sha256")


def _required(item: dataclasses.Field) -> bool:
    return item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING


def _class_dir_width(num_classes: int) -> int:
    # Zero-padded so that sorted folder names are the class order (RDED #4).
    return max(3, len(str(num_classes - 1)))


def save_images(
    folder: Path,
    images: Tensor,
    labels: Tensor,
    ipc: int,
    info: DatasetInfo,
    image_format: str,
    positions: list[int] | None = None,
) -> str:
    """Writes ``folder/<class>/<index>.<png|jpg>`` for class-major ``images`` with ``ipc`` per
    class (index = position within the class); only ``positions`` when given.

    Returns:
        The file pattern, for the manifest.
    """
    width = _class_dir_width(info.num_classes)
    index_width = max(3, len(str(ipc - 1)))
    suffix = "png" if image_format == "png" else "jpg"
    pixels = info.denormalize(images).clamp_(0, 1)

    def write(position: int) -> None:
        label = int(labels[position])
        within = position % ipc
        save_image(
            pixels[position],
            folder / f"{label:0{width}d}" / f"{within:0{index_width}d}.{suffix}",
            image_format,
        )

    todo = list(range(images.shape[0]) if positions is None else positions)
    # PIL's encoders release the GIL: files are written by a thread pool (each file's bytes do
    # not depend on the order). The class folders are made first, so threads do not race there.
    for label in sorted({int(labels[position]) for position in todo}):
        (folder / f"{label:0{width}d}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(write, todo))  # raises the first write's error
    return f"<class:0{width}d>/<index:0{index_width}d>.{suffix}"


def save_distilled(folder: str | Path, images: Tensor, labels: Tensor, manifest: Manifest) -> None:
    """Writes ``folder/distilled.pt`` and then ``folder/manifest.json`` (the images/ files, if
    any, are the caller's: :func:`save_images`).

    ``images``: (N, C, H, W) float32 normalized, or uint8 pixels (then the manifest says so).
    """
    folder = Path(folder)
    bad = first_non_finite(images)
    if bad is not None:  # the last guard: a NaN set is never written
        raise ValueError(
            f"{folder / 'distilled.pt'}: not written: image {bad} holds non-finite pixels "
            "(NaN or infinite)"
        )
    manifest.files.setdefault("distilled", "distilled.pt")
    manifest.images_dtype = "uint8" if images.dtype == torch.uint8 else "float32"
    torch_save({"images": images.contiguous(), "labels": labels}, folder / "distilled.pt")
    manifest.distilled_sha256 = sha256_file(folder / "distilled.pt")
    manifest.save(folder)


def verify_distilled(folder: str | Path, manifest: Manifest) -> None:
    """Checks ``folder/distilled.pt`` against the SHA-256 its manifest recorded (if any).

    Raises:
        IntegrityError: they differ.
    """
    path = Path(folder) / "distilled.pt"
    if manifest.distilled_sha256 is not None and sha256_file(path) != manifest.distilled_sha256:
        raise IntegrityError(
            f"{path}: its SHA-256 differs from the one manifest.json recorded when it was "
            "saved; the file is corrupt or was changed (re-run the command that made it)"
        )


def normalized(images: Tensor, info: DatasetInfo) -> Tensor:
    """Stored images (a batch or a whole set) as normalized float32 (N, C, H, W): uint8 pixels
    are scaled to [0, 1] and normalized with ``info``; float32 images are returned as they are."""
    if images.dtype == torch.uint8:
        return info.normalize(images.to(torch.float32).div_(255))
    return images


def load_distilled(folder: str | Path) -> tuple[Tensor, Tensor, Manifest]:
    """``(images (N, C, H, W) float32 normalized, labels (N,) int64, manifest)`` of a set.

    A uint8 set is normalized here (4 bytes a pixel); :func:`load_stored` keeps it as stored.
    """
    images, labels, manifest = load_stored(folder)
    return normalized(images, manifest.dataset), labels, manifest


def load_stored(folder: str | Path) -> tuple[Tensor, Tensor, Manifest]:
    """``(images as stored: float32 normalized or uint8 pixels, labels, manifest)`` of a set."""
    folder = Path(folder)
    if not (folder / "distilled.pt").is_file():
        raise FileNotFoundError(
            f"--distilled {folder}: no distilled.pt (pass the --out folder of `delt recover` or "
            "the distilled/ folder of `delt distill`)"
        )
    if not (folder / "manifest.json").is_file():
        raise FileNotFoundError(f"--distilled {folder}: no manifest.json beside distilled.pt")
    manifest = Manifest.load(folder)
    verify_distilled(folder, manifest)
    images, labels = _load_set_file(folder / "distilled.pt")
    stored = "uint8" if images.dtype == torch.uint8 else str(images.dtype).removeprefix("torch.")
    if stored != manifest.images_dtype:
        raise ValueError(
            f"--distilled {folder}: distilled.pt holds {stored} images, its manifest says "
            f"{manifest.images_dtype}"
        )
    return images, labels, manifest


def first_non_finite(images: Tensor, block: int = 256) -> int | None:
    """The index of the first image of ``images`` (N, ...) holding a NaN or infinite value, or
    None (always None for integer pixels). Checked ``block`` images at a time, so that the
    check never needs a mask of the whole set."""
    if not images.is_floating_point():
        return None
    for start in range(0, images.shape[0], block):
        finite = torch.isfinite(images[start : start + block]).flatten(1).all(1)
        if not bool(finite.all()):
            return start + int((~finite).nonzero()[0, 0])
    return None


def _load_set_file(path: Path) -> tuple[Tensor, Tensor]:
    what = "distilled set (distilled.pt of `delt recover`)"
    payload = torch_load(path, what, keys=("images", "labels"))
    images, labels = payload["images"], payload["labels"]
    if not (isinstance(images, Tensor) and isinstance(labels, Tensor)):
        raise FileFormatError(f"{path}: not a {what}: images and labels must be tensors")
    bad = first_non_finite(images) if images.dim() >= 1 else None
    if bad is not None:
        raise FileFormatError(
            f"{path}: image {bad} holds non-finite pixels (NaN or infinite): not a usable "
            "distilled set (re-run the command that made it)"
        )
    return images, labels


def check_distilled_set(
    images: Tensor, labels: Tensor, info: DatasetInfo, folder: str | Path
) -> None:
    """Refuses a set (of :func:`load_distilled`) that does not fit its dataset ``info``.

    Raises:
        ValueError: no images, not one label per image, or a label outside
            ``0 .. num_classes - 1``.
        DataMismatchError: images of another shape than the dataset's (C, H, W).
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(
            f"--distilled {folder}: the distilled set is empty (images of shape "
            f"{tuple(images.shape)}); nothing to evaluate"
        )
    expected = (info.channels, info.resolution, info.resolution)
    if tuple(images.shape[1:]) != expected:
        raise DataMismatchError(
            f"--distilled {folder}: images are {tuple(images.shape[1:])}, the dataset "
            f"{info.name} has {expected}"
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(f"--distilled {folder}: one label per image expected")
    if int(labels.min()) < 0 or int(labels.max()) >= info.num_classes:
        raise ValueError(
            f"--distilled {folder}: labels must be in 0..{info.num_classes - 1}, got "
            f"{int(labels.min())}..{int(labels.max())}"
        )


def union_prefix(images: Tensor, ipc: int, length: int) -> Tensor:
    """The first ``length`` images of every class of a class-major set with ``ipc`` per class.

    ``images`` (K * ipc, ...) → (K * length, ...), still class-major: the union U_k of a
    progressive run is ``union_prefix(U_P, IPC, offset_k + IPC_k)``.
    """
    if not 0 <= length <= ipc:
        raise ValueError(f"length must be in [0, ipc={ipc}], got {length}")
    per_class = images.reshape(-1, ipc, *images.shape[1:])
    return per_class[:, :length].reshape(-1, *images.shape[1:])


def load_stage_unions(folder: str | Path) -> list[tuple[Tensor, Tensor]]:
    """The unions U_1 … U_P of a finished ``--method pdd`` set: ``[(images, labels), ...]``.

    Images (N_k, C, H, W) float32 normalized, labels (N_k,) int64, class-major.

    Raises:
        FileNotFoundError: no manifest.
        ValueError: not a progressive set.
    """
    manifest = Manifest.load(folder)
    if not manifest.stages:
        raise ValueError(
            f"--distilled {folder} was made by --method {manifest.method}, not pdd: it "
            "has no stages to train on one after another"
        )
    verify_distilled(folder, manifest)
    images, labels = _load_set_file(Path(folder) / "distilled.pt")
    return [
        (
            union_prefix(images, manifest.ipc, entry["union_ipc"]),
            union_prefix(labels, manifest.ipc, entry["union_ipc"]),
        )
        for entry in manifest.stages
    ]
