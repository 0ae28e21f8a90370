"""``delt import-labels``: an FKD relabel folder (SRe2L's and CDA's soft labels) as a delt label
store, and its replay by ``delt eval --labels`` (docs/relabel.md, "Importing FKD folders").

The folder is what ``relabel/generate_soft_label.py`` of github.com/VILA-Lab/SRe2L writes (CDA
uses the same script and format; FKD: Shen & Xing, ECCV 2022): ``epoch_E/batch_B.tar``, each a
``torch.save`` of the list

    [coords  (b, 4) float32   RandomResizedCrop box per image: top/H, left/W, height/H, width/W
     flip    (b,) bool        horizontal flip per image (after the crop)
     index   (b,) int64       the mixing partner of each row (a permutation of 0..b-1), or None
     lam     float            Mixup/CutMix λ, or None
     box     [x1, y1, x2, y2] CutMix box in pixels of the crop (x: rows, y: columns), or None
     logits  (b, C) fp16/fp32 the teacher's output on the mixed batch]

(``relabel/utils_fkd.py``: ``RandomResizedCropWithCoords``, ``RandomHorizontalFlipWithRes``,
``mix_aug``). The files do not say which images a batch holds: the script draws them with a
``torch.utils.data.RandomSampler`` whose generator is seeded once with ``--fkd-seed`` (default
42) and kept across epochs, in batches of ``-b`` without dropping the last; its trainer
(``validate/train_FKD.py``) replays the same sampler (``get_img2batch_idx_list``) and patches
PyTorch's ``_MapDatasetFetcher`` to match batches to files. Here the order is rebuilt directly
(:func:`fkd_epoch_orders`, no patching): epoch e holds the (2e+1)-th ``torch.randperm(N)`` of
that generator, since each full pass of ``RandomSampler`` draws a second, unused permutation.
Dataset index i is image i of the delt set, which is ImageFolder's order (class folders in name
order, files in name order) for a set made by ``delt import`` from zero-padded class folders.

Files are read with ``torch.load(weights_only=True)``; the only globals allowed besides
tensors are numpy's scalar reconstruction and dtype (the CutMix box holds ``numpy.int64``
values from ``np.clip``). Nothing else is unpickled. Every field is checked (types, shapes,
dtypes, ranges; counts against the set) and a bad file is a one-line error naming it.

Replay (:func:`replay_fkd_batch`): each image (normalized, at the set's resolution) is cropped
to the recorded box, rounded to pixels as PIL's ``Image.crop`` rounds (``round()`` of top, left,
bottom, right), resized to the set's resolution (bilinear, antialiased: torch's, not PIL's
integer arithmetic), flipped if recorded; then the batch is mixed as recorded: CutMix pastes
``x[index]``'s box ``[:, :, x1:x2, y1:y2]``, Mixup takes ``λ·x + (1 − λ)·x[index]``.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from delt.config import ConfigError, check_int_fields, option
from delt.distilled_set import load_stored, normalized
from delt.io import FileFormatError, sha256_file
from delt.lock import results_lock
from delt.runtime import logger, versions
from delt.soft_labels import (
    LabelStore,
    StoreLayout,
    StoreMismatchError,
    check_disk,
    data_offset,
    encode_header,
    epoch_block,
    header_capacity,
    human_bytes,
    protocol_differences,
    read_header,
    store_header,
    store_size,
)

__all__ = [
    "FKD_DRAWS",
    "FkdBatch",
    "FkdLabels",
    "ImportLabelsConfig",
    "ImportLabelsResult",
    "check_fkd_store",
    "fkd_epoch_orders",
    "import_fkd_labels",
    "is_fkd_store",
    "read_fkd_batch",
    "replay_fkd_batch",
]

FKD_DRAWS = "FKD replay v1"
_EPOCH = re.compile(r"epoch_(\d+)")
_BATCH = re.compile(r"batch_(\d+)\.tar")
_LOGIT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _numpy_globals() -> list:
    """What ``torch.load(weights_only=True)`` may reconstruct besides tensors: numpy scalars
    (under numpy 2's and numpy 1's module names) and dtypes."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    allowed: list = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
    ]
    allowed += [type(np.dtype(name)) for name in ("int64", "int32", "float64", "float32")]
    return allowed


def fkd_epoch_orders(num_images: int, seed: int) -> Iterator[Tensor]:
    """Each epoch's order (N,) int64 of SRe2L's ``RandomSampler(generator seeded with
    --fkd-seed)``: batch b of the epoch is ``order[b * B : (b + 1) * B]``, row k of its file
    image ``order[b * B + k]``. Each pass draws ``randperm(N)`` and, when exhausted, a second
    permutation sliced to nothing (``RandomSampler.__iter__``: ``num_samples % n`` images)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(num_images, generator=generator)
        torch.randperm(num_images, generator=generator)  # the empty tail of the pass
        yield order


@dataclass(frozen=True)
class FkdBatch:
    """One checked ``batch_B.tar``: ``coords`` (b, 4) float32, ``flip`` (b,) bool, ``partner``
    (b,) int64 or None, ``lam`` float or None, ``box`` (x1, y1, x2, y2) or None, ``logits``
    (b, C) as stored; ``mix``: ``"cutmix"``, ``"mixup"`` or ``"none"``."""

    coords: Tensor
    flip: Tensor
    partner: Tensor | None
    lam: float | None
    box: tuple[int, int, int, int] | None
    logits: Tensor
    mix: str


def _number(value: object, kind: type) -> float | int | None:
    """``value`` as a Python ``kind`` if it is one (a Python, numpy or 0-d tensor number)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool:
            return None
        if kind is int and value.is_floating_point():
            return None
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return None
    if kind is int:
        return value if isinstance(value, int) else None
    return float(value) if isinstance(value, (int, float)) else None


def read_fkd_batch(path: Path, num_classes: int, resolution: int) -> FkdBatch:
    """Reads and checks one FKD batch file (module docstring) for a set of ``num_classes``
    classes at ``resolution`` pixels.

    Raises:
        FileFormatError: one line naming ``path`` and what was expected.
    """

    def bad(what: str) -> FileFormatError:
        return FileFormatError(f"--fkd {path}: {what}")

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or objects that are not data
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        if "Weights only load failed" in reason or "Unsupported global" in str(error):
            raise bad(
                "holds objects other than tensors, lists and numbers (refused, not unpickled)"
            ) from None
        raise bad(f"not a readable torch.save file (truncated or corrupt: {reason})") from None
    if not isinstance(data, (list, tuple)) or len(data) != 6:
        raise bad(
            "expected a list of 6 entries [coords, flip, mix index, lambda, box, logits] "
            f"(SRe2L's generate_soft_label.py), got {type(data).__name__}"
            + (f" of {len(data)}" if isinstance(data, (list, tuple)) else "")
        )
    coords, flip, partner, lam, box, logits = data
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.dtype not in _LOGIT_DTYPES:
        raise bad("logits (entry 6): expected a (b, C) float32/float16/bfloat16 tensor")
    count = logits.shape[0]
    if count == 0:
        raise bad("an empty batch")
    if logits.shape[1] != num_classes:
        raise bad(f"logits of {logits.shape[1]} classes, the set has {num_classes}")
    if not torch.isfinite(logits.float()).all():
        raise bad("logits hold NaN or infinite values")
    if not isinstance(coords, Tensor) or coords.shape != (count, 4) or (
        coords.dtype != torch.float32
    ):  # fmt: skip
        raise bad(f"coords (entry 1): expected a ({count}, 4) float32 tensor")
    top, left, height, width = coords.double().unbind(1)
    eps = 1e-5
    if not (
        torch.isfinite(coords).all() and (top >= 0).all() and (left >= 0).all()
        and (height > 0).all() and (width > 0).all()
        and (top + height <= 1 + eps).all() and (left + width <= 1 + eps).all()
    ):  # fmt: skip
        raise bad("coords (entry 1): crop boxes outside the image (fractions in [0, 1] expected)")
    if not isinstance(flip, Tensor) or flip.shape != (count,) or flip.dtype != torch.bool:
        raise bad(f"flip (entry 2): expected a ({count},) bool tensor")
    if partner is None and lam is None and box is None:
        return FkdBatch(coords, flip, None, None, None, logits, "none")
    if not isinstance(partner, Tensor) or partner.shape != (count,) or partner.dtype != (
        torch.int64
    ):  # fmt: skip
        raise bad(f"mix index (entry 3): expected a ({count},) int64 tensor or None")
    if not torch.equal(partner.sort().values, torch.arange(count)):
        raise bad(f"mix index (entry 3): not a permutation of 0..{count - 1}")
    lam_value = _number(lam, float)
    if lam_value is None or not 0 <= lam_value <= 1:
        raise bad("lambda (entry 4): expected a number in [0, 1]")
    if box is None:
        return FkdBatch(coords, flip, partner, lam_value, None, logits, "mixup")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise bad("box (entry 5): expected [x1, y1, x2, y2] or None")
    corners = [_number(value, int) for value in box]
    if any(value is None for value in corners):
        raise bad("box (entry 5): expected 4 integers")
    x1, y1, x2, y2 = corners
    if not (0 <= x1 <= x2 <= resolution and 0 <= y1 <= y2 <= resolution):
        raise bad(f"box (entry 5) {corners}: outside the {resolution}x{resolution} crop")
    return FkdBatch(coords, flip, partner, lam_value, (x1, y1, x2, y2), logits, "cutmix")


def _numbered(folder: Path, pattern: re.Pattern, what: str) -> list[Path]:
    """The entries of ``folder`` named by ``pattern`` (``epoch_E``, ``batch_B.tar``), in number
    order; an error names the first missing number."""
    found = {}
    for entry in folder.iterdir():
        match = pattern.fullmatch(entry.name)
        if match:
            found[int(match.group(1))] = entry
    for number in range(len(found)):
        if number not in found:
            name = pattern.pattern.replace(r"(\d+)", str(number)).replace("\\", "")
            raise FileFormatError(f"--fkd {folder}: {what} {name} is missing")
    return [found[number] for number in range(len(found))]


@dataclass
class ImportLabelsConfig:
    """Configuration of ``delt import-labels`` (one field per flag)."""

    fkd: str = option(
        help="an FKD relabel folder (epoch_E/batch_B.tar) of SRe2L's or CDA's "
        "generate_soft_label.py",
        identity=False,
    )
    distilled: str = option(
        help="the distilled set the folder labels (e.g. `delt import` of the released images)",
        identity=False,
    )
    fkd_seed: int = option(
        42,
        help="the --fkd-seed the folder was made with (its sampler's seed: which images each "
        "batch holds; SRe2L's and CDA's default 42)",
    )
    epochs: int | None = option(None, help="import the first E epochs (default: all)")
    out: str | None = option(
        None, help="the store file (default: DISTILLED/labels-fkd.labels)", identity=False
    )

    def __post_init__(self) -> None:
        check_int_fields(self, ("epochs",))
        check_int_fields(self, ("fkd_seed",), low=0)

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.distilled) / "labels-fkd.labels"


@dataclass
class ImportLabelsResult:
    """The store written (or found), its size, epochs, batch size, mixing and the share of rows
    whose largest logit is the class of the image the sampler puts there (a check of
    ``--fkd-seed``: near 1/C means another seed or another set)."""

    path: Path
    size: int
    epochs: int
    batch_size: int
    mix: str
    agreement: float
    reused: bool


def _survey(root: Path, epochs: int | None) -> tuple[list[list[Path]], int]:
    """The batch files of each imported epoch, and the folder's epoch count."""
    if not root.is_dir():
        raise FileNotFoundError(f"--fkd {root}: no such folder")
    folders = _numbered(root, _EPOCH, "epoch folder")
    if not folders:
        raise FileFormatError(f"--fkd {root}: no epoch_0 folder (not an FKD relabel folder)")
    if epochs is not None and epochs > len(folders):
        raise ConfigError(f"--epochs {epochs}: {root} holds {len(folders)} epochs")
    folders = folders[: epochs or len(folders)]
    files = [_numbered(folder, _BATCH, "batch file") for folder in folders]
    for folder, batches in zip(folders, files, strict=True):
        if len(batches) != len(files[0]):
            raise FileFormatError(
                f"--fkd {folder}: {len(batches)} batch files, {folders[0].name} has "
                f"{len(files[0])} (an unfinished run? --epochs E imports the first E)"
            )
    if not files[0]:
        raise FileFormatError(f"--fkd {folders[0]}: no batch_0.tar")
    return files, len(_numbered(root, _EPOCH, "epoch folder"))


def import_fkd_labels(config: ImportLabelsConfig) -> ImportLabelsResult:
    """Runs ``delt import-labels``: checks the folder against the set, then writes the store
    (``OUT.partial``, renamed when complete; removed if a later file is refused)."""
    out = config.out_path
    with results_lock(out):
        return _import(config, out)


def _import(config: ImportLabelsConfig, out: Path) -> ImportLabelsResult:
    root = Path(config.fkd)
    images, labels, manifest = load_stored(config.distilled)
    info = manifest.dataset
    num_images, num_classes, resolution = int(images.shape[0]), info.num_classes, info.resolution
    files, folder_epochs = _survey(root, config.epochs)
    first = read_fkd_batch(files[0][0], num_classes, resolution)
    batch_size = first.logits.shape[0]
    expected_rows = batch_size * (len(files[0]) - 1)
    last = read_fkd_batch(files[0][-1], num_classes, resolution)
    rows = expected_rows + last.logits.shape[0]
    if rows != num_images or last.logits.shape[0] > batch_size:
        raise StoreMismatchError(
            f"--fkd {root}: its batches hold {rows} images ({len(files[0])} batches of "
            f"{batch_size}), the set {config.distilled} has {num_images}: a folder made for "
            "another set"
        )
    dtype = _LOGIT_DTYPES[first.logits.dtype]
    epochs = len(files)
    protocol = {
        "dataset": info.name,
        "distilled_sha256": sha256_file(Path(config.distilled) / "distilled.pt"),
        "num_images": num_images,
        "num_classes": num_classes,
        "resolution": resolution,
        "batch_size": batch_size,
        "fkd_seed": config.fkd_seed,
        "mix": first.mix,
        "draws": FKD_DRAWS,
    }
    layout = StoreLayout.plan(epochs, rows, num_classes, None, dtype, replay="fkd")
    # An FKD folder does not name its teacher; the versions leave out the thread count, as
    # delt relabel's (the bytes do not depend on it).
    software = {k: v for k, v in versions().items() if k != "torch_threads"}
    header = store_header(protocol, layout, {"recorded": None}, software, None)
    header["origin"] = {
        "format": "FKD relabel folder (github.com/VILA-Lab/SRe2L relabel/generate_soft_label.py)",
        "folder": str(root.resolve()),
        "folder_epochs": folder_epochs,
        "sampler": "RandomSampler, generator seeded with --fkd-seed, kept across epochs",
    }
    size = store_size(header)
    if out.exists():
        existing, _ = read_header(out, "--out")
        if existing.get("protocol") == protocol and existing.get("layout") == layout.to_json():
            logger.info("import-labels: %s already holds these labels", out)
            return ImportLabelsResult(
                out, out.stat().st_size, epochs, batch_size, first.mix,
                float(existing.get("origin", {}).get("agreement", math.nan)), True,
            )  # fmt: skip
        differences = protocol_differences(existing.get("protocol", {}), protocol)
        raise ConfigError(
            f"--out {out} holds another store ({'; '.join(differences) or 'other layout'}); "
            "remove it or choose another --out"
        )
    logger.info(
        "import-labels: the store takes %s (%d epochs x %d rows x %d %s logits, %s)",
        human_bytes(size), epochs, rows, num_classes, dtype, first.mix,
    )  # fmt: skip
    check_disk(out, size)
    capacity = header_capacity(header)
    offset = data_offset(capacity)
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    digests: list[str] = []
    agree = 0
    try:
        with open(partial, "wb") as file:
            file.write(encode_header(header, capacity))
            file.truncate(size)
            for epoch, (batches, order) in enumerate(
                zip(files, fkd_epoch_orders(rows, config.fkd_seed), strict=False)
            ):
                arrays, agreed = _epoch_arrays(
                    batches, order, labels, batch_size, first.mix, dtype, num_classes, resolution
                )
                agree += agreed
                block = epoch_block(layout, arrays)
                file.seek(offset + epoch * layout.epoch_bytes)
                file.write(block)
                digests.append(hashlib.sha256(block).hexdigest())
            agreement = agree / (rows * epochs)
            header["origin"]["agreement"] = round(agreement, 6)
            file.seek(0)
            file.write(encode_header(dict(header, epoch_sha256=digests), capacity))
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if agreement <= 2 / num_classes:
        logger.warning(
            "import-labels: the largest logit is the class of the sampled image in only %.1f%% "
            "of rows (chance: %.1f%%): is --fkd-seed %d the folder's, and %s its set?",
            100 * agreement, 100 / num_classes, config.fkd_seed, config.distilled,
        )  # fmt: skip
    return ImportLabelsResult(out, size, epochs, batch_size, first.mix, agreement, False)


def _epoch_arrays(
    batches: list[Path], order: Tensor, labels: Tensor, batch_size: int, mix: str, dtype: str,
    num_classes: int, resolution: int,
) -> tuple[dict[str, Tensor], int]:  # fmt: skip
    """One epoch's store arrays from its checked batch files, and how many rows' largest logit
    is the class of the image the sampler puts there."""
    parts: dict[str, list[Tensor]] = {k: [] for k in ("values", "coords", "flip", "partner")}
    mixes = []
    agreed = 0
    for position, path in enumerate(batches):
        batch = read_fkd_batch(path, num_classes, resolution)
        count = batch.logits.shape[0]
        expected = min(batch_size, order.numel() - position * batch_size)
        if count != expected:
            raise FileFormatError(f"--fkd {path}: {count} images, expected {expected}")
        if batch.mix != mix:
            raise FileFormatError(f"--fkd {path}: {batch.mix} mixing, {batches[0]} has {mix}")
        if _LOGIT_DTYPES[batch.logits.dtype] != dtype:
            raise FileFormatError(f"--fkd {path}: {batch.logits.dtype} logits, expected {dtype}")
        index = order[position * batch_size : position * batch_size + count]
        agreed += int((batch.logits.float().argmax(1) == labels[index]).sum())
        parts["values"].append(batch.logits)
        parts["coords"].append(batch.coords)
        parts["flip"].append(batch.flip.to(torch.uint8))
        parts["partner"].append(
            torch.full((count,), -1) if batch.partner is None else batch.partner
        )
        row = [math.nan] * 5
        if batch.lam is not None:
            row[0] = batch.lam
        if batch.box is not None:
            row[1:] = batch.box
        mixes.append(torch.tensor([row], dtype=torch.float64).expand(count, 5))
    arrays = {name: torch.cat(values) for name, values in parts.items()}
    arrays["partner"] = arrays["partner"].to(torch.int32)
    arrays["mix"] = torch.cat(mixes)
    arrays["order"] = order.to(torch.int32)
    return arrays, agreed


def is_fkd_store(store: LabelStore) -> bool:
    """Whether ``store`` was imported from an FKD folder (:func:`import_fkd_labels`)."""
    return store.layout.replay == "fkd"


def check_fkd_store(store: LabelStore, current: dict, epochs: int, batch_size: int | None) -> None:
    """Refuses an imported FKD store for a ``delt eval`` whose set is not the store's
    (``current``: :func:`delt.soft_labels.protocol_of`'s entries), asks more epochs than it
    holds or another ``--batch-size`` than the folder's (its batches are recorded)."""
    keys = ("dataset", "distilled_sha256", "num_images", "num_classes", "resolution")
    stored = {key: store.protocol.get(key) for key in keys}
    differences = protocol_differences(stored, {key: current.get(key) for key in keys})
    if differences:
        raise StoreMismatchError(
            f"--labels {store.path} was imported for another set: {'; '.join(differences)}"
        )
    if epochs > store.layout.epochs:
        raise StoreMismatchError(
            f"--labels {store.path} holds {store.layout.epochs} epochs of FKD labels; "
            f"--epochs {epochs} needs more"
        )
    if batch_size is not None and batch_size != store.batch_size:
        raise StoreMismatchError(
            f"--batch-size {batch_size}: the FKD labels of {store.path} are recorded in batches "
            f"of {store.batch_size}; pass --batch-size {store.batch_size} or leave it out (a "
            "--protocol's batch size counts as given)"
        )


def replay_fkd_batch(
    batch: Tensor, coords: Tensor, flip: Tensor, partner: Tensor | None, mix: Tensor,
    size: int,
) -> Tensor:  # fmt: skip
    """FKD's recorded augmentation of one batch (module docstring).

    Args:
        batch: (b, C, H, W) float normalized images, row k the image of row k of the file.
        coords: (b, 4) float32 crop boxes (top, left, height, width as fractions of H, W).
        flip: (b,) bool/uint8: flip the crop horizontally.
        partner: (b,) int mixing partners, or None (no mixing).
        mix: (5,) float64: λ, x1, y1, x2, y2 (NaN where absent: Mixup has no box).
        size: the output resolution.

    Returns:
        (b, C, size, size) float32.
    """
    height, width = batch.shape[-2:]
    crops = []
    for row in range(batch.shape[0]):
        top, left, box_height, box_width = (float(v) for v in coords[row])
        # PIL's Image.crop rounds each edge (utils_fkd.py crops PIL images at float offsets).
        y0, x0 = round(top * height), round(left * width)
        y1 = min(height, max(round(top * height + box_height * height), y0 + 1))
        x1 = min(width, max(round(left * width + box_width * width), x0 + 1))
        y0, x0 = min(y0, y1 - 1), min(x0, x1 - 1)
        crop = F.interpolate(
            batch[row : row + 1, :, y0:y1, x0:x1], size=(size, size), mode="bilinear",
            align_corners=False, antialias=True,
        )  # fmt: skip
        crops.append(crop.flip(-1) if bool(flip[row]) else crop)
    images = torch.cat(crops)
    if partner is None:
        return images
    partner = partner.long().to(images.device)
    lam = float(mix[0])
    if math.isnan(float(mix[1])):  # Mixup
        return lam * images + (1 - lam) * images[partner]
    x1, y1, x2, y2 = (int(v) for v in mix[1:])
    images[:, :, x1:x2, y1:y2] = images[partner, :, x1:x2, y1:y2]
    return images


class FkdLabels:
    """An imported FKD store as ``delt eval --labels`` reads it: the recorded batches
    (:meth:`replay_epoch`) and their logits; a :class:`delt.student_trainer.SoftLabelSource`."""

    def __init__(self, store: LabelStore, normalize: Callable[[Tensor], Tensor], size: int):
        self.store = store
        self.path = store.path
        self.batch_size = store.batch_size
        self._normalize = normalize
        self._size = size

    @classmethod
    def for_set(cls, store: LabelStore, info) -> FkdLabels:
        """The replay of ``store`` for a set of dataset ``info`` (its normalization, size)."""
        return cls(store, lambda images: normalized(images, info), info.resolution)

    @property
    def digest(self) -> str:
        return self.store.digest

    @property
    def layout(self) -> StoreLayout:
        return self.store.layout

    def check_order(self, epoch: int, order: Tensor) -> None:  # pragma: no cover (unused)
        self.store.check_order(epoch, order)

    def logits(self, epoch: int, position: int, rows: slice) -> Tensor:
        return self.store.logits(epoch, position, rows)

    def replay_epoch(self, epoch: int, images: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """``(index (b,) int64, batch (b, C, R, R) float32)`` per recorded batch of ``epoch``:
        the set's images (N, C, H, W, as stored) of the batch, augmented and mixed as recorded."""
        order = self.store.order(epoch)
        for start in range(0, order.numel(), self.batch_size):
            rows = slice(start, start + self.batch_size)
            index = order[rows]
            batch = self._normalize(images.index_select(0, index.to(images.device)).cpu())
            partner = self.store.rows(epoch, "partner", rows)
            mix = self.store.rows(epoch, "mix", rows)[0]
            yield index, replay_fkd_batch(
                batch, self.store.rows(epoch, "coords", rows), self.store.rows(epoch, "flip", rows),
                None if int(partner[0]) < 0 else partner, mix, self._size,
            )  # fmt: skip
