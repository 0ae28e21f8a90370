"""The built-in synthesis methods, one module each, registered in :mod:`delt.method`'s registry
when imported (this package imports them all, in the order of ``--method``'s choices):
:mod:`~delt.methods.sre2l`, :mod:`~delt.methods.cda`, :mod:`~delt.methods.delt`
(pixel-optimizing presets of :class:`delt.synthesis.PixelMethod`), :mod:`~delt.methods.pdd`
(progressive stages of one of them), :mod:`~delt.methods.rded` (teacher-scored real crops) and
:mod:`~delt.methods.random_real` (``delt distill``'s baseline of random real images).
"""

# isort: skip_file
from delt.methods import sre2l, cda, delt, pdd, rded, random_real

__all__ = ["cda", "delt", "pdd", "random_real", "rded", "sre2l"]
