"""The soft-label store of ``delt relabel`` / ``delt eval --labels`` (docs/relabel.md).

One file holds a teacher's logits on every augmented, CutMix-mixed batch a ``delt eval`` student
sees over its epochs, for one seed: per epoch a block of

    order    (N,) int32        the epoch's shuffle (batch b: rows b*B .. (b+1)*B - 1)
    values   (N, K) dtype      full logits (K = classes) or the top-k logits, by row
    indices  (N, k) int16/32   top-k only: the classes of ``values``
    fill     (N,) dtype        top-k only: the logit every other class gets back

rows in batch order (the rows of batch b of epoch e are rows b*B .. of epoch e's block). The
file is ``MAGIC``, the header's capacity (uint64, little endian), a JSON header (space-padded),
then the epoch blocks at a page-aligned offset, each 64-byte aligned inside: a reader maps it
with :func:`numpy.memmap`, nothing is unpickled. The header records the protocol (what the
batches depend on), the storage, the layout, one SHA-256 per epoch block and its own SHA-256, so
a truncated, changed or bit-flipped file is refused in one line before any training.

Why not safetensors: its header is written once, before the data, and has no room for per-epoch
digests filled in as epochs finish (resume, torchrun ranks writing their epochs in place);
``.npy`` holds one array per file. A raw file with a JSON header is both, in one file.

Top-k reconstruction: FKD's marginal smoothing (Shen & Xing, ECCV 2022, github.com/szq0214/FKD;
TinyViT's sparse logits do the same): the kept classes keep their probabilities and the
remaining mass is spread evenly over the other classes. Done in logit space: every missing class
gets the row's ``fill`` logit, ``T * (logsumexp(z_rest / T) - log(K - k))`` at the store's
temperature ``T``, so ``softmax(reconstructed / T)`` is exactly that distribution (the store is
then tied to ``--temperature``; a full store is not).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from delt.config import ConfigError, flag
from delt.io import FileFormatError, IntegrityError, sha256_file
from delt.runtime import ResourceError, versions

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "LabelStore",
    "StoreLayout",
    "StoreMismatchError",
    "check_disk",
    "compress_logits",
    "human_bytes",
    "open_store",
    "protocol_differences",
    "protocol_of",
    "reconstruct_logits",
]

FORMAT = "delt-labels-v1"
# How the batches are drawn: delt.student_trainer.draw_epoch + AugmentedBatches (per batch).
DRAWS = "per-batch seeds v1"
MAGIC = b"DELTLBL1"
_PREFIX = len(MAGIC) + 8
_PAGE = 4096
_ALIGN = 64
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ITEM = {"fp32": 4, "fp16": 2, "bf16": 2}


class StoreMismatchError(ConfigError):
    """A store made for another set, seed, protocol or teacher than this evaluation's."""


def human_bytes(count: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def _aligned(offset: int, alignment: int = _ALIGN) -> int:
    return -(-offset // alignment) * alignment


@dataclass(frozen=True)
class StoreLayout:
    """Where an epoch's arrays lie: ``arrays`` maps a name to (numpy dtype, shape, offset in
    the epoch block); ``epoch_bytes`` is a block's size (64-byte aligned)."""

    epochs: int
    rows: int
    num_classes: int
    top_k: int | None
    dtype: str
    arrays: dict[str, tuple[str, tuple[int, ...], int]]
    epoch_bytes: int
    replay: str | None = None

    @classmethod
    def plan(
        cls, epochs: int, rows: int, num_classes: int, top_k: int | None, dtype: str,
        replay: str | None = None,
    ):  # fmt: skip
        """``replay="fkd"``: an imported FKD folder's recorded augmentation besides the logits,
        per row: ``coords`` (4 float32: top, left, height, width as fractions), ``flip``
        (uint8), ``partner`` (int32, the mixing partner's row in its batch; -1: none) and
        ``mix`` (5 float64: λ and the CutMix box, NaN where absent) (:mod:`delt.fkd_labels`)."""
        value_dtype = "float32" if dtype == "fp32" else "float16" if dtype == "fp16" else "int16"
        width = num_classes if top_k is None else top_k
        specs = [("order", "int32", (rows,)), ("values", value_dtype, (rows, width))]
        if top_k is not None:
            index_dtype = "int16" if num_classes <= 2**15 else "int32"
            specs += [("indices", index_dtype, (rows, top_k)), ("fill", value_dtype, (rows,))]
        if replay == "fkd":
            specs += [
                ("coords", "float32", (rows, 4)), ("flip", "uint8", (rows,)),
                ("partner", "int32", (rows,)), ("mix", "float64", (rows, 5)),
            ]  # fmt: skip
        elif replay is not None:
            raise FileFormatError(f"unknown replay {replay!r}")
        arrays, offset = {}, 0
        for name, numpy_dtype, shape in specs:
            arrays[name] = (numpy_dtype, shape, offset)
            offset = _aligned(offset + np.dtype(numpy_dtype).itemsize * math.prod(shape))
        return cls(epochs, rows, num_classes, top_k, dtype, arrays, offset, replay)

    def to_json(self) -> dict:
        data = {
            "epochs": self.epochs, "rows": self.rows, "num_classes": self.num_classes,
            "top_k": self.top_k, "dtype": self.dtype, "epoch_bytes": self.epoch_bytes,
            "arrays": {k: [d, list(s), o] for k, (d, s, o) in self.arrays.items()},
        }  # fmt: skip
        if self.replay is not None:  # absent otherwise: older stores keep their digests
            data["replay"] = self.replay
        return data

    @classmethod
    def from_json(cls, data: dict) -> StoreLayout:
        layout = cls.plan(
            int(data["epochs"]), int(data["rows"]), int(data["num_classes"]),
            None if data["top_k"] is None else int(data["top_k"]), str(data["dtype"]),
            data.get("replay"),
        )  # fmt: skip
        if layout.to_json() != data:
            raise FileFormatError("the layout does not match its own sizes")
        return layout


def header_capacity(header: dict) -> int:
    """Bytes reserved for the JSON header: its size with every epoch digest filled in."""
    filled = dict(header, epoch_sha256=["0" * 64] * header["layout"]["epochs"])
    filled["header_sha256"] = "0" * 64
    return len(json.dumps(filled, sort_keys=True).encode()) + 512


def data_offset(capacity: int) -> int:
    return _aligned(_PREFIX + capacity, _PAGE)


def store_size(header: dict) -> int:
    """The file's size in bytes (header area and every epoch block)."""
    layout = header["layout"]
    return data_offset(header_capacity(header)) + layout["epochs"] * layout["epoch_bytes"]


def _header_digest(header: dict) -> str:
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def encode_header(header: dict, capacity: int) -> bytes:
    """MAGIC, the capacity, the JSON header (with its digest) padded to ``capacity``."""
    header = dict(header, header_sha256=_header_digest(header))
    text = json.dumps(header, sort_keys=True).encode()
    if len(text) > capacity:
        raise RuntimeError("the store's header outgrew its reserved space")
    return MAGIC + struct.pack("<Q", capacity) + text + b" " * (capacity - len(text))


def check_disk(path: Path, size: int, have: int = 0) -> None:
    """Refuses a store of ``size`` bytes that the disk of ``path`` cannot hold (``have``:
    bytes of it already there, a run resumed)."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if size - have > free:
        raise ResourceError(
            f"--out {path}: the store needs {human_bytes(size)} and {folder} has "
            f"{human_bytes(free)} free; use --top-k, --dtype fp16 or another --out"
        )


def compress_logits(logits: Tensor, top_k: int | None, dtype: str, temperature: float):
    """The arrays of ``logits`` (R, K) float32 as stored: full ``values`` in ``dtype``, or the
    top-k ``values`` (descending), their ``indices`` and the row's ``fill`` (module docstring)."""
    store_dtype = DTYPES[dtype]
    logits = logits.float()
    if top_k is None:
        return {"values": logits.to(store_dtype)}
    values, indices = logits.topk(top_k, dim=1)
    rest = logits.scatter(1, indices, float("-inf")) / temperature
    count = logits.shape[1] - top_k
    fill = temperature * (rest.logsumexp(1) - math.log(count))
    return {"values": values.to(store_dtype), "indices": indices, "fill": fill.to(store_dtype)}


def reconstruct_logits(values: Tensor, indices: Tensor | None, fill: Tensor | None, classes: int):
    """(R, K) float32 logits from stored arrays (:func:`compress_logits`)."""
    values = values.float()
    if indices is None:
        return values
    full = fill.float()[:, None].expand(-1, classes).clone()
    return full.scatter_(1, indices.long(), values)


def _numpy_bytes(tensor: Tensor, numpy_dtype: str) -> bytes:
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return np.ascontiguousarray(tensor.cpu().numpy().astype(numpy_dtype, copy=False)).tobytes()


def epoch_block(layout: StoreLayout, arrays: dict[str, Tensor]) -> bytes:
    """One epoch's block: ``arrays`` (order and :func:`compress_logits`'s) at their offsets."""
    block = bytearray(layout.epoch_bytes)
    for name, (numpy_dtype, shape, offset) in layout.arrays.items():
        data = _numpy_bytes(arrays[name], numpy_dtype)
        expected = np.dtype(numpy_dtype).itemsize * math.prod(shape)
        if len(data) != expected:
            raise RuntimeError(f"the store's {name}: {len(data)} bytes, expected {expected}")
        block[offset : offset + len(data)] = data
    return bytes(block)


def _shown(key: str, value: object) -> str:
    if key.endswith("sha256") and isinstance(value, str):
        return f"SHA-256 {value[:12]}"
    return repr(value)


def protocol_differences(stored: dict, current: dict) -> list[str]:
    """``name: store's value, this run's value`` for every protocol entry that differs."""
    return [
        f"{key}: store {_shown(key, stored.get(key))}, this run {_shown(key, current.get(key))}"
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]


class LabelStore:
    """A complete store, opened for reading (:func:`open_store`): the labels of every (epoch,
    batch), memory-mapped. A :class:`delt.student_trainer.SoftLabelSource`."""

    def __init__(self, path: Path, header: dict, offset: int) -> None:
        self.path = path
        self.header = header
        self.layout = StoreLayout.from_json(header["layout"])
        self.batch_size = int(header["protocol"]["batch_size"])
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        self._offset = offset

    @property
    def protocol(self) -> dict:
        return self.header["protocol"]

    @property
    def digest(self) -> str:
        """The store's identity: its header's SHA-256 (which covers every epoch's)."""
        return self.header["header_sha256"]

    def _array(self, epoch: int, name: str) -> np.ndarray:
        numpy_dtype, shape, offset = self.layout.arrays[name]
        start = self._offset + epoch * self.layout.epoch_bytes + offset
        count = math.prod(shape)
        flat = self._map[start : start + count * np.dtype(numpy_dtype).itemsize]
        return flat.view(numpy_dtype).reshape(shape)

    def _tensor(self, epoch: int, name: str, rows: slice) -> Tensor:
        array = np.array(self._array(epoch, name)[rows])  # a copy: the map stays read-only
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if name in ("values", "fill") and (
            self.layout.dtype == "bf16"
        ) else tensor  # fmt: skip

    def order(self, epoch: int) -> Tensor:
        return self._tensor(epoch, "order", slice(None)).long()

    def rows(self, epoch: int, name: str, rows: slice) -> Tensor:
        """Rows ``rows`` of epoch ``epoch``'s array ``name`` (a copy, as stored)."""
        self._check_epoch(epoch)
        return self._tensor(epoch, name, rows)

    def check_order(self, epoch: int, order: Tensor) -> None:
        self._check_epoch(epoch)
        if not torch.equal(self.order(epoch), order.cpu().long()):
            raise StoreMismatchError(
                f"--labels {self.path}: epoch {epoch + 1}'s shuffle differs from the one this "
                "run draws (another torch version?); run `delt relabel` again"
            )

    def _check_epoch(self, epoch: int) -> None:
        if not 0 <= epoch < self.layout.epochs:
            raise StoreMismatchError(
                f"--labels {self.path} holds {self.layout.epochs} epochs, not epoch {epoch + 1}"
            )

    def logits(self, epoch: int, position: int, rows: slice) -> Tensor:
        self._check_epoch(epoch)
        start = position * self.batch_size
        end = min(start + self.batch_size, self.layout.rows)
        picked = slice(
            start + (rows.start or 0), start + (end - start if rows.stop is None else rows.stop)
        )
        values = self._tensor(epoch, "values", picked)
        if self.layout.top_k is None:
            return values.float()
        return reconstruct_logits(
            values, self._tensor(epoch, "indices", picked), self._tensor(epoch, "fill", picked),
            self.layout.num_classes,
        )  # fmt: skip


def read_header(path: Path, label: str = "--labels") -> tuple[dict, int]:
    """The header of the store at ``path`` and the offset of its data; one-line errors for a
    file that is not a store, or whose header is cut or changed."""
    with open(path, "rb") as file:
        prefix = file.read(_PREFIX)
        if len(prefix) < _PREFIX or prefix[: len(MAGIC)] != MAGIC:
            raise FileFormatError(f"{label} {path}: not a delt label store (`delt relabel`)")
        (capacity,) = struct.unpack("<Q", prefix[len(MAGIC) :])
        if capacity > 2**28:
            raise IntegrityError(f"{label} {path}: the store's header is corrupt")
        raw = file.read(capacity)
    if len(raw) < capacity:
        raise IntegrityError(f"{label} {path}: the store is truncated (in its header)")
    try:
        header = json.loads(raw.decode().rstrip(" "))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(f"{label} {path}: the store's header is corrupt") from None
    if not isinstance(header, dict) or header.get("header_sha256") != _header_digest(header):
        raise IntegrityError(f"{label} {path}: the store's header is corrupt (SHA-256 differs)")
    if header.get("format") != FORMAT:
        raise FileFormatError(
            f"{label} {path}: store format {header.get('format')!r}, this delt reads {FORMAT!r}"
        )
    return header, data_offset(capacity)


def open_store(path: str | os.PathLike, verify: bool = True) -> LabelStore:
    """Opens a complete store for reading; every epoch block's SHA-256 is checked (``verify``)
    before any training, so a corrupt store fails in one line, not after hours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--labels {path}: no such store (make it with `delt relabel`)")
    header, offset = read_header(path)
    layout = header["layout"]
    expected = offset + layout["epochs"] * layout["epoch_bytes"]
    size = path.stat().st_size
    if size != expected:
        raise IntegrityError(
            f"--labels {path}: the store is truncated or padded ({size} bytes, expected {expected})"
        )
    digests = header.get("epoch_sha256", [])
    if len(digests) != layout["epochs"] or not all(digests):
        raise IntegrityError(f"--labels {path}: an unfinished store; finish it with delt relabel")
    store = LabelStore(path, header, offset)
    if verify:
        for epoch, digest in enumerate(digests):
            start = offset + epoch * layout["epoch_bytes"]
            block = store._map[start : start + layout["epoch_bytes"]]
            if hashlib.sha256(block).hexdigest() != digest:
                raise IntegrityError(
                    f"--labels {path}: epoch {epoch + 1}'s labels are corrupt (SHA-256 differs)"
                )
    return store


def check_protocol(store: LabelStore, current: dict, epochs: int, bn_mode: str = "eval") -> None:
    """Refuses ``store`` for a run of ``epochs`` epochs whose protocol is ``current`` and whose
    teacher's BatchNorm runs in ``bn_mode`` (``train``: ``--teacher-batch-stats``), naming what
    differs."""
    stored = {k: v for k, v in store.protocol.items() if k != "epochs"}
    differences = protocol_differences(stored, {k: v for k, v in current.items() if k != "epochs"})
    if differences:
        raise StoreMismatchError(
            f"--labels {store.path} was made for other settings: {'; '.join(differences)}"
        )
    # The augmentation a store replays is torch's and torchvision's: another version may draw
    # or resample other crops than the labelled ones; said, not refused (most releases do not).
    recorded = store.header.get("versions", {})
    current = versions()
    moved = [
        f"{name} {recorded[name]} -> {current[name]}"
        for name in ("torch", "torchvision")
        if name in recorded and recorded[name] != current[name]
    ]
    if moved:
        logger.warning(
            "--labels %s was made with other versions (%s): if they augment differently, the "
            "stored labels are of other crops than the student sees; relabel to be sure",
            store.path, ", ".join(moved),
        )  # fmt: skip
    made = store.header.get("teacher", {}).get("bn_mode", "eval")
    if made != bn_mode:
        wanted = "--teacher-batch-stats" if bn_mode == "train" else "no --teacher-batch-stats"
        raise StoreMismatchError(
            f"--labels {store.path} holds labels of the teacher's BatchNorm in {made} mode "
            f"(delt relabel --bn-mode {made}); this evaluation asks for {bn_mode} mode "
            f"({wanted}, or its --protocol)"
        )
    if epochs > store.layout.epochs:
        raise StoreMismatchError(
            f"--labels {store.path} holds {store.layout.epochs} epochs; {flag('epochs')} "
            f"{epochs} needs more (run `delt relabel --epochs {epochs}`)"
        )


def store_header(
    protocol: dict, layout: StoreLayout, teacher: dict, versions: dict, temperature: float | None
) -> dict:
    """A new store's header (no epoch done yet)."""
    return {
        "format": FORMAT,
        "protocol": protocol,
        "storage": {
            "kind": "full" if layout.top_k is None else "top-k",
            "top_k": layout.top_k,
            "dtype": layout.dtype,
            "reconstruction": None
            if layout.top_k is None
            else "FKD marginal smoothing at the temperature (fill logit)",
            "temperature": temperature,
        },
        "layout": layout.to_json(),
        "teacher": teacher,
        "versions": versions,
        "epoch_sha256": [None] * layout.epochs,
    }


def protocol_of(context: Any, seed: int) -> dict:
    """What the batches of a ``delt eval`` seed depend on (and the teacher that labels them):
    ``context`` is a :class:`delt.evaluate.EvalContext` of a distilled set. The student, its
    optimizer, LR and ``--epochs`` (beyond the store's) do not enter: one store serves them all.
    """
    config = context.config
    return {
        "dataset": context.info.name,
        "distilled_sha256": sha256_file(Path(config.distilled) / "distilled.pt"),
        "teacher_sha256": sha256_file(context.teacher.path),
        "seed": int(seed),
        "num_images": int(context.images.shape[0]),
        "num_classes": int(context.info.num_classes),
        "resolution": int(context.info.resolution),
        "batch_size": int(context.settings.batch_size),
        "cutmix_beta": float(config.cutmix_beta),
        "randaugment_ops": int(config.randaugment_ops),
        "randaugment_magnitude": int(config.randaugment_magnitude),
        "min_crop": float(config.min_crop),
        "shuffle_patches": config.shuffle_patches,
        "draws": DRAWS,
    }
