"""Small runtime helpers shared by the commands: devices, autocast, seeds, versions, logging."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["autocast", "derive_seed", "logger", "machine", "resolve_device", "versions"]

logger = logging.getLogger("delt")


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
    """``amp == "bf16"``: bfloat16 autocast on ``device``; ``"none"``: full precision."""
    if amp == "none":
        yield
    elif amp == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        raise ValueError(f"--amp must be 'none' or 'bf16', got {amp!r}")


def derive_seed(seed: int, *indices: int) -> int:
    """A 63-bit seed for the unit ``indices`` of a run seeded with ``seed``.

    numpy's ``SeedSequence`` mixes the entropy, so neighbouring chunks get unrelated streams and
    chunk k's seed does not depend on how many chunks ran before it (which makes resume exact).
    """
    state = np.random.SeedSequence([seed, *indices]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def versions() -> dict[str, str]:
    """Versions that determine a run's numbers: python, torch, torchvision, numpy, delt_ext."""
    import delt_ext

    try:
        import torchvision

        torchvision_version = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        torchvision_version = "missing"
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision_version),
        "numpy": str(np.__version__),
        "delt_ext": str(delt_ext.__version__),
        "delt_ext_ops": str(delt_ext.HAS_OPS),
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
