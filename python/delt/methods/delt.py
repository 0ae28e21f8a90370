"""DELT (Shen et al., CVPR 2025; github.com/VILA-Lab/DELT): real initial images of `delt select`,
class-contiguous chunks, EarlyLate rounds (``--round-iterations``), CDA's crop curriculum and no
roll (its scripts pass ``--jitter 0``)."""

from __future__ import annotations

from delt.method import MethodRecipe, register
from delt.schedules import class_contiguous_chunks
from delt.synthesis import PixelMethod

__all__ = ["DELT"]


def _no_jitter(resolution: int) -> int:
    return 0


DELT = register(
    PixelMethod(
        "delt", MethodRecipe("selection", class_contiguous_chunks, "cosine", True, _no_jitter)
    )
)
