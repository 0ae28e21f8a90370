"""Loads the compiled library, which registers the ``torch.ops.delt_ext`` ops.

When it cannot be loaded (not built, or built against another torch), the package still imports
and every public function falls back to :mod:`delt_ext.reference`, after one warning that says
why. The commonest cause is importing the package from a source checkout (the working directory
comes first on ``sys.path``), which shadows the installed, compiled copy; that case gets its own
message with the two fixes.
"""

import importlib.machinery
import os
import sys
import warnings

PACKAGE_DIR: str = os.path.dirname(os.path.abspath(__file__))
LOAD_ERROR: str | None = None
LIBRARY_PATH: str | None = None  # the loaded _C file
try:
    from delt_ext import _C  # noqa: F401  (importing runs the op registrations)

    LIBRARY_PATH = getattr(_C, "__file__", None)
except (ImportError, OSError) as error:
    LOAD_ERROR = f"{type(error).__name__}: {error}"

HAS_OPS: bool = LOAD_ERROR is None


def _has_compiled_file(package_dir: str) -> bool:
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return any(os.path.isfile(os.path.join(package_dir, "_C" + suffix)) for suffix in suffixes)


def is_source_tree(package_dir: str = PACKAGE_DIR) -> bool:
    """True when ``package_dir`` is the ``delt_ext/`` folder of a checkout without a build in it."""
    checkout = os.path.dirname(package_dir)
    return (
        os.path.isfile(os.path.join(checkout, "setup.py"))
        and os.path.isdir(os.path.join(checkout, "csrc"))
        and not _has_compiled_file(package_dir)
    )


def shadowed_installation(package_dir: str = PACKAGE_DIR) -> str | None:
    """The folder of another ``delt_ext`` on ``sys.path`` that holds a compiled library, if any."""
    checkout = os.path.realpath(os.path.dirname(package_dir))
    others = [
        entry
        for entry in sys.path
        if os.path.realpath(entry or os.getcwd()) != checkout  # "" is the working directory
    ]
    spec = importlib.machinery.PathFinder.find_spec("delt_ext", others)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if _has_compiled_file(location):
            return location
    return None


def fallback_message() -> str:
    """The warning given when the compiled library is missing (empty when it is loaded)."""
    if HAS_OPS:
        return ""
    if is_source_tree():
        installed = shadowed_installation()
        shadow = (
            f"; it shadows the compiled copy installed at {installed}"
            if installed
            else "; no compiled copy was found elsewhere on sys.path"
        )
        return (
            f"delt_ext: imported from the source tree {PACKAGE_DIR}, which holds no compiled "
            f"library (no _C built there){shadow}. The slow pure-PyTorch reference "
            "implementation is in use. Fix: run Python from another directory (so that the "
            "installed package is imported), or build in place with "
            "`pip install -e . --no-build-isolation`. `python -m delt_ext` shows which path "
            "is active."
        )
    return (
        f"delt_ext: the compiled library could not be loaded ({LOAD_ERROR}). Falling back to the "
        "pure-PyTorch reference implementation, which is correct but slower. Rebuild against the "
        "installed torch with `pip install --no-build-isolation .`; `python -m delt_ext` shows "
        "the build."
    )


if not HAS_OPS and is_source_tree():
    # Python's own text here blames a "partially initialized module (circular import)".
    LOAD_ERROR = f"no compiled _C in {PACKAGE_DIR} (a source tree, not a build)"
if not HAS_OPS:
    warnings.warn(fallback_message(), RuntimeWarning, stacklevel=2)
