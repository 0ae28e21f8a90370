"""DELT (Shen et al., CVPR 2025; github.com/VILA-Lab/DELT): real initial images of `delt select`,
class-contiguous chunks, EarlyLate rounds (``--round-iterations``), CDA's crop curriculum and no
roll (its scripts pass ``--jitter 0``)."""

from delt.method import MethodRecipe, register
from delt.methods.pixels import PixelMethod
from delt.schedules import class_contiguous_chunks

RECIPE = MethodRecipe("selection", class_contiguous_chunks, "cosine", True, lambda _: 0)
DELT = register(PixelMethod("delt", RECIPE))
