"""CDA (Yin & Shen, TMLR 2024): SRe2L with a curriculum of the crop scale (cosine)."""

from delt.method import MethodRecipe, register, sre2l_jitter
from delt.methods.pixels import PixelMethod
from delt.schedules import class_interleaved_chunks

RECIPE = MethodRecipe("noise", class_interleaved_chunks, "cosine", False, sre2l_jitter)
CDA = register(PixelMethod("cda", RECIPE))
