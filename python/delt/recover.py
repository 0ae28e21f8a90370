"""``delt recover``: synthesize a distilled set from a frozen teacher with one of the registered
methods (docs/methods.md; :mod:`delt.methods`: ``sre2l``, ``cda``, ``delt``, ``pdd``,
``rded``). Outputs: ``OUT/distilled.pt``, ``OUT/images/``, ``OUT/manifest.json``
(:mod:`delt.distilled_set`), and the resume state ``OUT/chunks/`` and ``OUT/run.json``. One process
at a time writes ``OUT`` (``OUT/.lock``, :mod:`delt.lock`).
"""

from __future__ import annotations

from dataclasses import dataclass

from delt.config import check_int_fields, option
from delt.lock import output_lock
from delt.method import (
    RecoverResult,
    SynthesisConfig,
    check_method_options,
    method_named,
    methods,
    option_types,
)
from delt.methods import pdd  # noqa: F401 (registers the built-in methods)

__all__ = ["RecoverConfig", "recover"]


@dataclass(kw_only=True)
class RecoverConfig(*reversed(option_types()), SynthesisConfig):  # type: ignore[misc]
    """Configuration of ``delt recover``: the shared options (:class:`delt.method.
    SynthesisConfig`) and every registered method's own (one field per flag; a method's flags
    are refused on the others)."""

    method: str = option(
        "delt",
        help="synthesis method (pdd: progressive stages; rded: teacher-scored real crops, no "
        "optimization)",
        choices=lambda: tuple(methods(recovers=True)),
    )

    def __post_init__(self) -> None:
        method = method_named(self.method, recovers=True)
        check_int_fields(self, ("ipc", "iterations", "batch_size"))
        check_method_options(self, method, self.ipc)
        method.check(self)


def recover(config: SynthesisConfig) -> RecoverResult:
    """Runs (or resumes) a recovery with ``config``'s method; writes ``distilled.pt``,
    ``images/`` and ``manifest.json``.

    Holds ``OUT/.lock`` throughout; removes the temporary files a killed run left; a finished
    run writes nothing.
    """
    with output_lock(config.out) as lock:
        lock.sweep()
        return method_named(config.method, recovers=True).recover(config)
