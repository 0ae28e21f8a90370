"""SRe2L (Yin et al., NeurIPS 2023): images from noise, class-interleaved chunks (one image per
class), a fixed crop scale, no rounds, a roll of 32 pixels at >= 224 px (else 4)."""

from delt.method import MethodRecipe, register, sre2l_jitter
from delt.methods.pixels import PixelMethod
from delt.schedules import class_interleaved_chunks

RECIPE = MethodRecipe("noise", class_interleaved_chunks, "fixed", False, sre2l_jitter)
SRE2L = register(PixelMethod("sre2l", RECIPE))
