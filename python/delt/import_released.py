"""``delt import``: a released distilled set (a folder of class folders of images) as a delt set.

SRe2L, CDA and DELT write ``new{class:03d}/class{class:03d}_id{k:03d}.jpg``, RDED zero-padded
class-index folders; others name folders by WNID or class name. Each class folder is mapped to
one of the teacher's classes, by name first (an exact class name, e.g. a WNID) and else by its
number (``new007``, ``class007``, ``00007``, ``7``: class 7 of the teacher's order). The mapping
is printed and recorded in the manifest. Images are stored as uint8 pixels (``images_dtype``
``uint8`` in :mod:`delt.distilled_set`), class-major, files in name order within a class.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from delt.config import identity_dict, option
from delt.data import DatasetInfo, normalization_note, shown_name
from delt.distilled_set import Manifest, save_distilled
from delt.io import check_output, image_size, read_image, read_json, sha256_file
from delt.lock import output_lock
from delt.models import load_checkpoint
from delt.runtime import logger, versions

__all__ = ["IMAGE_SUFFIXES", "ImportConfig", "ImportResult", "import_images", "map_class_folders"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_NUMBERED = re.compile(r"(?:new|class)?(\d+)")


@dataclass
class ImportConfig:
    """Configuration of ``delt import`` (one field per flag)."""

    images: str = option(
        help="folder of class folders of images (PNG/JPEG), e.g. a released SRe2L/CDA/DELT "
        "(new007/class007_id003.jpg) or RDED (00007/*.png) set",
        identity=False,
    )
    teacher: str = option(help="teacher checkpoint whose classes the folders are mapped to")
    out: str = option(help="output folder: OUT/distilled.pt + OUT/manifest.json", identity=False)
    resize: bool = option(
        False,
        help="resize images to the teacher's resolution (shorter side, then a center crop); "
        "without it an image of another size is an error",
    )
    data_root: str | None = option(
        None,
        help="folder of the real dataset, recorded for `delt eval` (default: the dataset's own)",
        identity=False,
    )


@dataclass
class ImportResult:
    """What ``import_images`` wrote: the folder, image count and the class mapping."""

    out: Path
    num_images: int
    mapping: list[dict]
    reused: bool


@dataclass(frozen=True)
class _ClassFolder:
    folder: str
    label: int
    by: str  # "name" or "number"
    files: tuple[Path, ...]


def map_class_folders(
    names: list[str], info: DatasetInfo, where: str
) -> list[tuple[str, int, str]]:
    """``(folder name, class index, "name" | "number")`` for each folder, in class order.

    Raises:
        ValueError: a folder that is neither a class name nor a class number in range, or two
            folders for one class (each message names the folders).
    """
    by_name = {name: index for index, name in enumerate(info.class_names)}
    mapped: list[tuple[str, int, str]] = []
    unknown: list[str] = []
    for name in names:
        if name in by_name:
            mapped.append((name, by_name[name], "name"))
            continue
        match = _NUMBERED.fullmatch(name)
        if match and int(match.group(1)) < info.num_classes:
            mapped.append((name, int(match.group(1)), "number"))
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(shown_name(n) for n in unknown[:5])
        more = f", ... ({len(unknown)} in all)" if len(unknown) > 5 else ""
        raise ValueError(
            f"--images {where}: class folder(s) {shown}{more} are neither one of the teacher's "
            f"{info.num_classes} class names (e.g. {shown_name(info.class_names[0])}) nor a "
            f"class number 0..{info.num_classes - 1} (new007, class007, 00007, 7)"
            f"{normalization_note(unknown, info.class_names)}"
        )
    seen: dict[int, str] = {}
    for name, label, _ in mapped:
        if label in seen:
            raise ValueError(
                f"--images {where}: folders {shown_name(seen[label])} and {shown_name(name)} are "
                f"both class {label} ({shown_name(info.class_names[label])})"
            )
        seen[label] = name
    return sorted(mapped, key=lambda item: item[1])


def _scan(folder: Path, info: DatasetInfo) -> list[_ClassFolder]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder")
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not names:
        raise ValueError(f"--images {folder}: no class folder in it")
    classes = []
    for name, label, by in map_class_folders(names, info, str(folder)):
        files = tuple(
            sorted(
                path
                for path in (folder / name).iterdir()
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
            )
        )
        if not files:
            raise ValueError(
                f"--images {folder}: class folder {name!r} holds no image "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
        classes.append(_ClassFolder(name, label, by, files))
    absent = sorted(set(range(info.num_classes)) - {c.label for c in classes})
    if absent:
        shown = ", ".join(f"{c} ({info.class_names[c]!r})" for c in absent[:5])
        raise ValueError(
            f"--images {folder}: no folder for class(es) {shown}"
            f"{f', ... ({len(absent)} in all)' if len(absent) > 5 else ''} of the teacher's "
            f"{info.num_classes}"
        )
    return classes


def _check_sizes(classes: list[_ClassFolder], info: DatasetInfo, where: str) -> None:
    """Reads only the headers: every image must be resolution x resolution."""
    expected = (info.resolution, info.resolution)
    for entry in classes:
        for path in entry.files:
            size = image_size(path)
            if size != expected:
                raise ValueError(
                    f"--images {where}: {path} is {size[0]}x{size[1]}, the teacher takes "
                    f"{expected[0]}x{expected[1]}; pass --resize to resize"
                )


def _read_pixels(path: Path, info: DatasetInfo, resize: bool) -> Tensor:
    """One image as uint8 (C, H, W), in the teacher's channels (RGB or grayscale); a 16-bit
    image is scaled to 8 bits (:func:`delt.io.read_image`)."""
    image = read_image(path, "RGB" if info.channels == 3 else "L")
    if resize and image.size != (info.resolution, info.resolution):
        from torchvision.transforms import functional

        image = functional.center_crop(functional.resize(image, info.resolution), info.resolution)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _listing_digest(classes: list[_ClassFolder], root: Path) -> str:
    """SHA-256 over the files' relative names and bytes: the imported content's identity."""
    digest = hashlib.sha256()
    for entry in classes:
        for path in entry.files:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def import_images(config: ImportConfig) -> ImportResult:
    """Runs ``delt import``: checks everything, then writes ``OUT/distilled.pt`` + manifest.

    Holds ``OUT/.lock`` throughout (:func:`delt.lock.output_lock`).

    Raises:
        FileNotFoundError: no such teacher or image folder.
        ValueError: unknown, duplicate or missing classes, an empty class folder, an image of
            another size without ``--resize``, or an ``--out`` holding
            another set. All before anything is written.
        WriteError: ``--out`` cannot be written (checked first).
    """
    check_output(config.out, "--out")
    with output_lock(config.out) as lock:
        lock.sweep()
        return _import_images(config)


def _import_images(config: ImportConfig) -> ImportResult:
    teacher = load_checkpoint(config.teacher)
    info = teacher.info
    root = Path(config.images)
    classes = _scan(root, info)
    if not config.resize:
        _check_sizes(classes, info, str(root))
    out = Path(config.out)
    source_digest = _listing_digest(classes, root)
    teacher_sha = sha256_file(teacher.path)
    identity = {
        **identity_dict(config),
        "images_sha256": source_digest,
        "teacher_sha256": teacher_sha,
    }
    if (out / "manifest.json").is_file() or (out / "distilled.pt").is_file():
        saved = read_json(out / "manifest.json") if (out / "manifest.json").is_file() else {}
        if (saved.get("import") or {}).get("identity") != identity:
            raise ValueError(
                f"--out {out}: holds another distilled set; choose another --out or delete it"
            )
        manifest = Manifest.load(out)
        logger.info("import: %s already holds this import", out)
        return ImportResult(out, manifest.num_images, manifest.extra["import"]["mapping"], True)

    paths = [path for entry in classes for path in entry.files]
    labels = torch.tensor([entry.label for entry in classes for _ in entry.files])
    shape = (len(paths), info.channels, info.resolution, info.resolution)
    images = torch.empty(shape, dtype=torch.uint8)
    for position, path in enumerate(paths):
        images[position] = _read_pixels(path, info, config.resize)
    mapping = [
        {"folder": c.folder, "class": c.label, "name": info.class_names[c.label], "by": c.by,
         "images": len(c.files)}
        for c in classes
    ]  # fmt: skip
    manifest = Manifest(
        method="imported",
        ipc=max(1, round(images.shape[0] / info.num_classes)),
        dataset=info,
        teacher={"path": str(teacher.path), "sha256": teacher_sha, "meta": teacher.meta},
        config={**identity_dict(config), "images": str(root), "out": str(out),
                "data_root": config.data_root},
        num_images=int(images.shape[0]),
        iterations_per_image=[0] * int(images.shape[0]),
        synthesis_seconds=0.0,
        versions=versions(),
        files={"distilled": "distilled.pt", "source": str(root.resolve())},
        extra={"import": {"identity": identity, "mapping": mapping, "resized": config.resize}},
    )  # fmt: skip
    save_distilled(out, images, labels, manifest)
    return ImportResult(out, int(images.shape[0]), mapping, False)
