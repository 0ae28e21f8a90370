"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Every writer goes to a temporary file in the destination's folder and then ``os.replace``s it
onto the final name, which is atomic on POSIX file systems. A killed process leaves at most a
stray ``.<name>.<random>.tmp`` file, never a truncated output; the next run of the command removes
it (:func:`remove_stray_temporaries`, under the folder's lock). :func:`write_json` and
:func:`write_if_changed` leave a file whose bytes would not change untouched, so a finished run
re-run writes nothing (and works on read-only media).

Fault injection, for tests: with ``DELT_FAULT_KILL_AT_WRITE=k`` the process SIGKILLs itself at its
k-th atomic write, after the temporary file is written and before it replaces the destination;
with ``DELT_FAULT_LOG=FILE`` every atomic write appends its destination to FILE (the write points).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import re
import signal
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

__all__ = [
    "FileFormatError",
    "WriteError",
    "IntegrityError",
    "atomic_open",
    "check_output",
    "read_json",
    "image_size",
    "read_image",
    "remove_stray_temporaries",
    "save_image",
    "sha256_file",
    "torch_load",
    "to_uint8",
    "torch_save",
    "write_if_changed",
    "write_json",
]


class IntegrityError(ValueError):
    """A file's contents are not the ones recorded when it was written (corrupt or changed)."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; outputs get the permissions a plain open() would give them.
_FILE_MODE = 0o666 & ~_current_umask()


class FileFormatError(ValueError):
    """A file named by the user is unreadable, truncated, corrupt or not what was expected; the
    message names the file and what it should be."""


class WriteError(OSError):
    """An output could not be written (full disk, read-only media, no permission); the message
    names the file and says that what was there before is untouched."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: itself, or one it was raised from or while handling (torch's
    zip writer turns the ENOSPC of a write into a RuntimeError raised during that OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


_WRITE_REASONS = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def _write_error(path: Path, error: BaseException, started: bool = True) -> WriteError:
    cause = _os_error(error)
    if cause is not None:
        reason = _WRITE_REASONS.get(cause.errno, cause.strerror or str(cause))
    else:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    cleanup = " (the partial temporary file was removed)" if started else ""
    return WriteError(
        f"cannot write {path}: {reason}; nothing was replaced{cleanup}",
        None if cause is None else cause.errno,
    )


# (pid, atomic writes so far) of the fault-injection hook; a forked child counts from 0.
_fault_writes = [os.getpid(), 0]


def _fault_point(path: Path) -> None:
    log = os.environ.get("DELT_FAULT_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(f"{path}\n")
    kill_at = os.environ.get("DELT_FAULT_KILL_AT_WRITE")
    if kill_at:
        if _fault_writes[0] != os.getpid():
            _fault_writes[:] = [os.getpid(), 0]
        _fault_writes[1] += 1
        if _fault_writes[1] == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)


# What atomic_open names its temporary files: "." + the destination's name + "." + mkstemp's
# 8 random characters + ".tmp".
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stray_temporaries(
    folder: str | os.PathLike, names: tuple[str, ...] | None = None, recursive: bool = True
) -> list[Path]:
    """Deletes the temporary files a killed :func:`atomic_open` left in ``folder``.

    Only files named as ``atomic_open`` names them, and with ``names`` only those of these
    destination names; ``recursive`` descends into sub-folders, except those that hold a
    ``.lock`` (another command's folder: it cleans its own). Call it holding ``folder``'s lock.

    Returns:
        The files deleted.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    pending = [folder]
    while pending:
        current = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if recursive and not os.path.exists(os.path.join(entry.path, ".lock")):
                        pending.append(Path(entry.path))
                    continue
                if not entry.is_file(follow_symlinks=False) or not _TEMPORARY.match(entry.name):
                    continue
                if names is not None and not any(
                    entry.name.startswith(f".{name}.") and len(entry.name) == len(name) + 14
                    for name in names
                ):
                    continue
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Opens a temporary file beside ``path``; on success it replaces ``path``, else it goes."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _write_error(path, error, started=False) from error
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _fault_point(path)
        os.chmod(tmp_name, _FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException as error:
        # Also on KeyboardInterrupt: leave no temporary file behind.
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        if isinstance(error, OSError) or _os_error(error) is not None:
            raise _write_error(path, error) from error
        raise


def write_if_changed(path: str | os.PathLike, data: bytes) -> bool:
    """Writes ``data`` to ``path`` atomically unless the file already holds exactly these bytes.

    Returns:
        Whether it wrote.
    """
    path = Path(path)
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return True


def _non_finite_at(obj: Any, where: str = "") -> str | None:
    """The key path (``stages[2].loss``) of the first NaN or infinite float in ``obj``, else
    None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the value"
    if isinstance(obj, dict):
        items = ((f"{where}.{key}" if where else str(key), value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{index}]", value) for index, value in enumerate(obj))
    else:
        return None
    for path, value in items:
        found = _non_finite_at(value, path)
        if found is not None:
            return found
    return None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON (keys in insertion order), atomically; a file that holds
    the same JSON already is left as it is.

    Raises:
        ValueError: ``obj`` holds a NaN or infinite float (standard JSON has none; delt writes
            none), naming the file and the key; nothing is written.
    """
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError:
        where = _non_finite_at(obj)
        if where is None:
            raise
        raise ValueError(
            f"{path}: not written: {where} is not a finite number (NaN or infinity), which "
            "JSON cannot hold"
        ) from None
    write_if_changed(path, (text + "\n").encode())


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"it holds {name}, which is not standard JSON (delt never writes it)")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Reads a JSON file.

    Raises:
        FileFormatError: it is not valid UTF-8 JSON (truncated, corrupt), or it holds ``NaN`` or
            ``Infinity`` (Python's extension of JSON, which no delt version writes), naming the
            file.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FileFormatError(
            f"{path}: not a readable {what}: truncated or corrupt JSON ({error})"
        ) from None
    except ValueError as error:  # NaN, Infinity
        raise FileFormatError(f"{path}: not a readable {what}: {error}") from None


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


def torch_load(
    path: str | os.PathLike, what: str = "torch file", keys: tuple[str, ...] = ()
) -> Any:
    """Loads a local file with ``weights_only=True``: tensors and plain Python values only.

    Never unpickles arbitrary objects, so a checkpoint from elsewhere cannot run code.

    Args:
        path: the file.
        what: what the file should be, for the error message ("teacher checkpoint").
        keys: when given, the file must hold a dict with these keys.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: the file is truncated, corrupt, not a torch file, holds Python objects
            that ``weights_only`` refuses, or lacks ``keys``; one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with warnings.catch_warnings():
            # A foreign pickle protocol: the refusal below says what matters.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise FileFormatError(f"{path}: cannot read the {what}: permission denied") from None
    except MemoryError:
        raise
    except Exception as error:  # torch raises many types here, none of them meaningful alone
        raise FileFormatError(f"{path}: not a readable {what}: {_load_failure(error)}") from None
    if keys and not (isinstance(payload, dict) and all(key in payload for key in keys)):
        raise FileFormatError(
            f"{path}: not a {what} (a torch file, but not a dict with the keys {', '.join(keys)})"
        )
    return payload


def _load_failure(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in our words. torch's own message for a
    refused pickle suggests turning ``weights_only`` off; that advice is never passed on."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "weights only" in text.lower():
        marker = "Unsupported global: GLOBAL "
        if marker in text:
            name = text.split(marker, 1)[1].split()[0]
            return (
                f"it holds a Python object ({name}) other than tensors and plain values; delt "
                "loads only those (weights_only) and never runs code from a file: it may be a "
                "foreign file, or a malicious one"
            )
        return (
            "it is truncated, corrupt, or a pickle that is not a torch file (delt loads "
            "tensors and plain values only, with weights_only; it may be a foreign file, or a "
            "malicious one)"
        )
    return "it is truncated, corrupt, or not a torch file"


def check_output(
    path: str | os.PathLike, label: str, folder: bool = True, probe: bool = True
) -> None:
    """Refuses an output path that cannot be written, before any work is done.

    ``path`` is an output folder (``folder=True``) or file. It need not exist; nothing is
    created. With ``probe``, the nearest existing folder is probed with a temporary file (created
    and removed), so read-only media and missing permissions are caught too; without, only the
    path's shape is checked (a file where a folder should be, or under a file), which a run that
    may turn out to write nothing (a cached result) can check up front.

    Raises:
        WriteError: ``"<label> <path>: <why it cannot be written>"``.
    """
    path = Path(path)
    if path.exists() and folder and not path.is_dir():
        raise WriteError(f"{label} {path}: exists and is not a folder", errno.ENOTDIR)
    if path.exists() and not folder and path.is_dir():
        raise WriteError(f"{label} {path}: is a folder, expected a file path", errno.EISDIR)
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise WriteError(f"{label} {path}: {existing} is a file, not a folder", errno.ENOTDIR)
    if not probe:
        return
    try:
        # Not named as atomic_open's temporaries: a sweep of ``existing`` (another rank's, or
        # another command's of a folder above its own) must not take it for a killed write.
        fd, probe_name = tempfile.mkstemp(
            prefix=".delt-write-check.", suffix=".probe", dir=existing
        )
    except OSError as error:
        reason = {
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied",
            errno.ENOSPC: "the disk is full",
        }.get(error.errno, error.strerror or str(error))
        message = f"{label} {path}: cannot write in {existing}: {reason}"
        raise WriteError(message, error.errno) from None
    os.close(fd)
    os.unlink(probe_name)


def _image_error(path: str | os.PathLike, error: BaseException) -> FileFormatError:
    text = " ".join(str(error).split()) or type(error).__name__
    return FileFormatError(
        f"{path}: not a readable image: truncated, corrupt or not a PNG/JPEG file ({text})"
    )


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file, from its header alone.

    Raises:
        FileFormatError: not a readable image, naming the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (FileNotFoundError, PermissionError, MemoryError):
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, its own errors
        raise _image_error(path, error) from None


def read_image(path: str | os.PathLike, mode: str = "RGB") -> Any:
    """An image file, fully decoded, as an 8-bit PIL image in ``mode`` (``"RGB"`` or ``"L"``).

    16-bit grayscale (PIL modes ``I;16*``, and ``I`` holding values in 0..65535, as PIL reads
    16-bit PNGs) is scaled to 8 bits (``round(v * 255 / 65535)``), not clipped at 255 as PIL's
    ``convert`` would; PIL reads 16-bit RGB(A) PNGs as their high bytes, a scaling too. A 32-bit
    float image (mode ``F``) or an integer one outside 0..65535 has no defined range: refused.
    8-bit images are exactly PIL's ``Image.open(path).convert(mode)``.

    Raises:
        FileFormatError: not a readable image (truncated, corrupt, not an image), or of a depth
            that cannot be read as 8 bits, naming the file.
    """
    import numpy as np
    from PIL import Image

    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "F":
                raise FileFormatError(
                    f"{path}: a 32-bit floating-point image (PIL mode F), whose pixel range is "
                    "not defined; save it as an 8- or 16-bit PNG"
                )
            if image.mode == "I" or image.mode.startswith("I;16"):
                values = np.asarray(image)
                if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
                    raise FileFormatError(
                        f"{path}: a 32-bit integer image (PIL mode {image.mode}) with values "
                        f"outside 0..65535; save it as an 8- or 16-bit PNG"
                    )
                scaled = (values.astype(np.uint32) * 255 + 32767) // 65535
                return Image.fromarray(scaled.astype(np.uint8)).convert(mode)
            return image.convert(mode)
    except (FileFormatError, FileNotFoundError, PermissionError, MemoryError):
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, its own errors
        raise _image_error(path, error) from None


def to_uint8(image: Tensor, image_format: str = "png") -> Tensor:
    """The 8-bit pixels :func:`save_image` encodes: (C, H, W) float in [0, 1] → uint8 (C, H, W).

    Values are clamped to [0, 1] and multiplied by 255 in float32, then

    * ``"png"``: rounded to nearest (torchvision's ``save_image`` convention): the float tensors
      in ``distilled.pt`` are the exact result, the PNG files a faithful lossless 8-bit view;
    * ``"jpeg"``: truncated, as the DELT/SRe2L/CDA code does before saving its JPEGs
      (``(x * 255).astype(np.uint8)`` after clamping to [0, 1]; github.com/VILA-Lab/DELT), so that
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
    options = {"format": "PNG"} if image_format == "png" else {"format": "JPEG", "quality": quality}
    with atomic_open(path, "wb") as handle:
        pil.save(handle, **options)
