"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Every writer goes to a temporary file in the destination's folder and then ``os.replace``s it
onto the final name, which is atomic on POSIX file systems. A killed process leaves at most a
stray ``.tmp`` file, never a truncated output.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

__all__ = [
    "atomic_open",
    "check_output_folder",
    "read_json",
    "save_image",
    "sha256_file",
    "torch_load",
    "to_uint8",
    "torch_save",
    "write_json",
]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; outputs get the permissions a plain open() would give them.
_FILE_MODE = 0o666 & ~_current_umask()


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Opens a temporary file beside ``path``; on success it replaces ``path``, else it goes."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException:
        # Also on KeyboardInterrupt: leave no temporary file behind.
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def check_output_folder(path: str | os.PathLike, label: str = "--out") -> Path:
    """Creates the output folder ``path`` if needed and checks that files can be written there,
    before any work: an unwritable ``--out`` is reported at once, not after hours of it.

    Raises:
        ValueError: ``path`` is a file, cannot be created, or is not writable (naming ``label``).
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{label} {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{label} {folder}: cannot create it ({error.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{label} {folder}: not writable")
    return folder


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON (keys in insertion order), atomically."""
    with atomic_open(path, "w") as handle:
        json.dump(obj, handle, indent=2)
        handle.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as handle:
        return json.load(handle)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (what run identities record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path``, atomically."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def torch_load(path: str | os.PathLike) -> Any:
    """Loads a local file with ``weights_only=True``: tensors and plain Python values only.

    Never unpickles arbitrary objects, so a checkpoint from elsewhere cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def to_uint8(image: Tensor, image_format: str = "png") -> Tensor:
    """The 8-bit pixels :func:`save_image` encodes: (C, H, W) float in [0, 1] → uint8 (C, H, W).

    Values are clamped to [0, 1] and multiplied by 255 in float32, then

    * ``"png"``: rounded to nearest (torchvision's ``save_image`` convention): the float tensors
      in ``distilled.pt`` are the exact result, the PNG files a faithful lossless 8-bit view;
    * ``"jpeg"``: truncated, as the DELT/SRe2L/CDA code does before saving its JPEGs
      (``(x * 255).astype(np.uint8)`` after clamping to [0, 1], delt.md §3.6), so that
      ``--image-format jpeg`` gives the papers' files. E.g. 0.999 → 254 (rounding: 255).
    """
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    scaled = image.detach().to(torch.float32).clamp(0, 1).mul_(255)
    if image_format == "png":
        scaled = scaled.add_(0.5).clamp_(max=255)
    # float → uint8 truncates toward zero; every value is >= 0 here.
    return scaled.to(torch.uint8)


def save_image(
    image: Tensor, path: str | os.PathLike, image_format: str = "png", quality: int = 75
) -> None:
    """Saves one image, atomically.

    Args:
        image: (C, H, W) float in [0, 1] (denormalized), C = 1 or 3.
        path: destination; its suffix is not inspected, ``image_format`` decides.
        image_format: ``"png"`` (lossless, pixels rounded to 8 bits) or ``"jpeg"`` (pixels
            truncated to 8 bits as the papers' code, then PIL quality ``quality``; 75 is PIL's
            default, which the DELT/SRe2L code saves with). See :func:`to_uint8`.
        quality: JPEG quality, ignored for PNG.
    """
    from PIL import Image

    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be (C, H, W) with C = 1 or 3, got {tuple(image.shape)}")
    array = to_uint8(image, image_format).cpu().permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    writer: Callable[[IO], None]
    if image_format == "png":
        writer = lambda handle: pil.save(handle, format="PNG")  # noqa: E731
    else:
        writer = lambda handle: pil.save(handle, format="JPEG", quality=quality)  # noqa: E731
    with atomic_open(path, "wb") as handle:
        writer(handle)
