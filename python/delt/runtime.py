"""Small runtime helpers shared by the commands: devices, autocast, seeds, versions, logging."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch

__all__ = [
    "DEFAULT_THREADS",
    "ResourceError",
    "autocast",
    "available_memory",
    "check_memory",
    "derive_seed",
    "logger",
    "machine",
    "resolve_device",
    "versions",
    "with_threads",
]

T = TypeVar("T")
logger = logging.getLogger("delt")

# The CLI's torch CPU thread count unless `delt --threads N`: fixed, because results differ in
# the last bits between thread counts (the reductions split differently), so a count taken from
# the machine's cores or load would make the numbers depend on where and when a command ran.
DEFAULT_THREADS = 1


class ResourceError(RuntimeError):
    """A requested size cannot fit the machine (memory); the message gives the numbers."""


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated now on ``device``: MemAvailable of ``/proc/meminfo`` (else
    the free physical pages) for the CPU, the CUDA driver's free memory for a GPU; None where
    neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def check_memory(what: str, nbytes: int, device: torch.device | str = "cpu") -> None:
    """Refuses, before allocating, ``nbytes`` that exceed the memory available on ``device``.

    Args:
        what: the allocation in the user's terms, naming the flags that size it
            ("--resolution 100000: 320 synthetic images of 3x100000x100000").

    Raises:
        ResourceError: ``"<what> need <n> GB, <m> GB are available on <device>"``.
    """
    device = torch.device(device)
    available = available_memory(device)
    if available is not None and nbytes > available:
        raise ResourceError(
            f"{what} need {_gigabytes(nbytes)} of memory, {_gigabytes(available)} are available "
            f"on {device.type}"
        )


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Under torchrun (``LOCAL_RANK`` set) a CUDA device without an index is ``cuda:LOCAL_RANK``:
    one GPU per rank.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if resolved.type == "cuda" and resolved.index is None and "LOCAL_RANK" in os.environ:
        resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return resolved


@contextlib.contextmanager
def autocast(device: torch.device, amp: str) -> Iterator[None]:
    """``amp == "bf16"``/``"fp16"``: bfloat16/float16 autocast on ``device``; ``"none"``: full
    precision. (fp16 needs a gradient scaler for training: ``torch.amp.GradScaler``.)"""
    if amp == "none":
        yield
    elif amp in ("bf16", "fp16"):
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield
    else:
        raise ValueError(f"--amp must be 'none', 'bf16' or 'fp16', got {amp!r}")


def with_threads(threads: int, run: Callable[[], T]) -> T:
    """``run()`` with torch's CPU threads set to ``threads`` (0: left as they are), then reset."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(before)


def derive_seed(seed: int, *indices: int) -> int:
    """A 63-bit seed for the unit ``indices`` of a run seeded with ``seed``.

    numpy's ``SeedSequence`` mixes the entropy, so neighbouring chunks get unrelated streams and
    chunk k's seed does not depend on how many chunks ran before it (which makes resume exact).
    """
    state = np.random.SeedSequence([seed, *indices]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def versions() -> dict[str, str]:
    """What determines a run's numbers besides its flags: the versions of python, torch,
    torchvision, numpy and delt_ext, and torch's CPU thread count (``torch_threads``)."""
    import torchvision

    import delt_ext

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": str(np.__version__),
        "delt_ext": str(delt_ext.__version__),
        "delt_ext_ops": str(delt_ext.HAS_OPS),
        "torch_threads": str(torch.get_num_threads()),
    }


def machine() -> dict[str, object]:
    """Where a measurement ran: python, torch, intra-op threads, CPU model, GPU, start time."""
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _cpu_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()
