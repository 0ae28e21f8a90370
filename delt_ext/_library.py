"""Loads the compiled library, which registers the ``torch.ops.delt_ext`` ops.

When it cannot be loaded (not built, or built against another torch), the package still imports
and every public function falls back to :mod:`delt_ext.reference`, after one warning.
"""

import warnings

LOAD_ERROR: str | None = None
try:
    from delt_ext import _C  # noqa: F401  (importing runs the op registrations)
except (ImportError, OSError) as error:
    LOAD_ERROR = f"{type(error).__name__}: {error}"

HAS_OPS: bool = LOAD_ERROR is None

if not HAS_OPS:
    warnings.warn(
        f"delt_ext: the compiled library could not be loaded ({LOAD_ERROR}). Falling back to the "
        "pure-PyTorch reference implementation, which is correct but slower. Rebuild against the "
        "installed torch with `pip install --no-build-isolation .`; `python -m delt_ext` shows "
        "the build.",
        RuntimeWarning,
        stacklevel=2,
    )
