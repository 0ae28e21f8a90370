"""The results store of ``delt eval``: results files, the evaluations of other identities kept
beside them, and a seed's training state while it trains.

A results file (``eval.json``, ``eval-stagewise.json``, ``--out``) caches every finished seed of
one run identity (:func:`delt.identity.run_identity`; checked by
:func:`delt.identity.identity_differences`, whose rule keeps older files valid: a field at its
default is not part of the identity, and an input an older identity lacks was recorded since).
An evaluation of another identity is never lost: it is kept as ``<stem>-kept/<key>.json`` and
comes back when its flags are used again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from delt.distributed import all_gather, is_main, world
from delt.identity import identity_differences
from delt.io import read_json, torch_load, torch_save, write_json
from delt.runtime import logger
from delt.student_trainer import AccuracyCheck, StudentTrainer

__all__ = [
    "DATA_KEY",
    "EvalResult",
    "ResultsFile",
    "SeedResult",
    "kept_folder",
    "load_seed_state",
    "mean_std",
    "save_seed_state",
    "summary",
]

# The identity's data fingerprints; results files written before it existed lack it.
DATA_KEY = "data_fingerprints"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's default, ``ddof=0``)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std())


@dataclass
class SeedResult:
    """One student: best and final top-1 (%), its test curve and per-epoch training loss."""

    seed: int
    best_accuracy: float
    best_epoch: int
    final_accuracy: float
    curve: list[dict]
    train_loss: list[float]
    seconds: float
    indices: list[int] | None = None  # --random-real: the drawn training-set indices

    @classmethod
    def from_checks(
        cls,
        seed: int,
        checks: list[AccuracyCheck],
        losses: list[float],
        seconds: float,
        indices=None,
    ) -> SeedResult:
        best = max(checks, key=lambda check: check.accuracy)  # the earliest of equal bests
        return cls(
            seed=seed, best_accuracy=best.accuracy, best_epoch=best.epoch,
            final_accuracy=checks[-1].accuracy, curve=[asdict(c) for c in checks],
            train_loss=losses, seconds=seconds, indices=indices,
        )  # fmt: skip


def summary(seeds: Sequence[SeedResult]) -> dict:
    """A results file's summary over ``seeds``: best and final top-1 mean ± std (None without
    seeds; ``accuracy_*`` repeat the best) and the students' training seconds."""
    best = mean_std([s.best_accuracy for s in seeds]) if seeds else (None, None)
    final = mean_std([s.final_accuracy for s in seeds]) if seeds else (None, None)
    return {
        "best": {"mean": best[0], "std": best[1]},
        "final": {"mean": final[0], "std": final[1]},
        "accuracy_mean": best[0],
        "accuracy_std": best[1],
        "wall_seconds": float(sum(s.seconds for s in seeds)),
    }


@dataclass
class EvalResult:
    """What ``delt eval`` reports; ``document`` is the eval.json content."""

    path: Path
    seeds: list[SeedResult]
    accuracy_mean: float
    accuracy_std: float
    final_mean: float
    final_std: float
    reused: bool
    document: dict = field(repr=False)

    @classmethod
    def read(cls, path: Path, seeds: list, reused: bool, document: dict | None = None):
        """The result whose summary (best and final mean ± std) is the written file ``path``
        (or ``document``, a results file's content that was not written)."""
        document = read_json(path) if document is None else document
        best, final = document["best"], document["final"]
        return cls(
            path, seeds, best["mean"], best["std"], final["mean"], final["std"], reused, document
        )


def kept_folder(path: Path) -> Path:
    """Where the results of other identities than the one in results file ``path`` are kept:
    ``<stem>-kept/`` beside it (not matched by ``eval-*.json``)."""
    return path.parent / f"{path.stem}-kept"


def _differences(document: dict, format: str, identity: dict, defaults: dict) -> list[str]:
    """What differs between the results ``document`` and ``identity``
    (:func:`delt.identity.identity_differences`); a document of another kind differs whole."""
    saved = document.get("identity") if document.get("format") == format else None
    if not isinstance(saved, dict):
        return ["not a results file of this kind"]
    return identity_differences(saved, identity, defaults)


@dataclass
class ResultsFile:
    """A results file (``eval.json``, ``eval-stagewise.json``, ``--out``) and the evaluations of
    other identities kept beside it.

    The file at :attr:`path` holds the evaluation of the last run; an evaluation of another
    identity found there is never replaced: before the first write of this run it moves to
    ``<stem>-kept/<key>.json`` (``key``: a digest of its identity; a WARNING names the flags
    that differ), and a later run with its flags takes it back from there, finished seeds and
    all. Readers of ``eval.json`` (``delt report``, ``delt distill``, the quality benchmark)
    see the last run's evaluation, as before.

    A file of this identity written before identities recorded the data fingerprints
    (:data:`DATA_KEY`, an input recorded since) is reused as it is, never rewritten, with a
    WARNING that its test split was not recorded (``legacy``); when it lacks a requested seed it
    is kept aside like any other identity and everything is evaluated afresh.

    Attributes:
        identity, defaults: the run's identity and its defaults
            (:func:`delt.identity.identity_differences`).
        document: the saved results of this identity (None: none yet).
        legacy: ``document`` predates the data fingerprints (read-only).
    """

    path: Path
    format: str
    identity: dict
    defaults: dict
    document: dict | None = None
    legacy: bool = False
    _source: Path | None = None  # where ``document`` was read from
    _other: dict | None = None  # the content of ``path`` when it holds another identity

    @classmethod
    def open(cls, path: Path, format: str, identity: dict, defaults: dict) -> ResultsFile:
        """Finds the saved results of ``identity``: in ``path``, else kept beside it (a kept
        file that predates the data fingerprints is never taken back)."""
        results = cls(path, format, json.loads(json.dumps(identity)), defaults)
        if path.is_file():
            saved = read_json(path)
            if not _differences(saved, format, results.identity, defaults):
                results.document, results._source = saved, path
                results.legacy = DATA_KEY not in saved["identity"]
                return results
            results._other = saved
        for kept in sorted(kept_folder(path).glob("*.json")):
            saved = read_json(kept)
            if DATA_KEY in saved.get("identity", {}) and not _differences(
                saved, format, results.identity, defaults
            ):
                results.document, results._source = saved, kept
                logger.info("eval: %s holds the finished seeds of these flags", kept)
                break
        return results

    def keep_legacy(self, answers: bool) -> bool:
        """A legacy document that ``answers`` the run is reused as it is, with a WARNING that its
        test split was not recorded (True); one that does not is kept aside as another
        identity's, and everything is evaluated afresh (False)."""
        if answers:
            logger.warning(
                "eval: %s predates test-split fingerprints: its test split was not recorded; "
                "it is reused as it is (not rewritten)",
                self.path,
            )
            return True
        self._other, self.document, self.legacy, self._source = self.document, None, False, None
        return False

    @property
    def needs_write(self) -> bool:
        """Whether ``path`` does not yet hold this identity's results (taken back from their
        kept copy, or another identity is in the way)."""
        return self._source != self.path

    def write(self, document: dict) -> None:
        """Writes ``document`` (this identity's) to ``path``, first keeping another identity's
        results that are there; then drops this identity's kept copy (now in ``path``)."""
        if self.legacy:
            raise RuntimeError(f"{self.path} predates data fingerprints: it is not rewritten")
        if self._other is not None:
            other_identity = self._other.get("identity", self._other)
            text = json.dumps(other_identity, sort_keys=True, separators=(",", ":"))
            kept = kept_folder(self.path) / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
            differences = _differences(self._other, self.format, self.identity, self.defaults)
            if not differences:  # this identity, before the data fingerprints
                differences = ["its test split was not recorded"]
            write_json(kept, self._other)
            logger.warning(
                "eval: %s held an evaluation with another configuration (%s); it is kept as %s "
                "(the same flags take it back)", self.path, "; ".join(differences), kept,
            )  # fmt: skip
            self._other = None
        write_json(self.path, document)
        if self._source is not None and self._source != self.path:
            self._source.unlink(missing_ok=True)
            folder = self._source.parent
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self._source = self.path


SEED_STATE_FORMAT = "delt-eval-seed-state-v1"


def _generator_states(trainer: StudentTrainer) -> dict:
    return {
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "generator": trainer.generator.get_state(),
    }


def save_seed_state(
    path: Path, identity: dict, seed: int, trainer: StudentTrainer, losses: list[float],
    checks: list[AccuracyCheck], seconds: float,
) -> None:  # fmt: skip
    """Called on every rank (a collective under torchrun); rank 0 writes ``path``.

    The model, optimizer and schedule are the same on every rank (DDP); the generators are
    saved per rank (``ranks``), so that a resumed rank continues with its own (its CUDA
    device's generator is its own, whatever the CPU draws have in common).
    """
    ranks = all_gather(_generator_states(trainer))
    if not is_main():
        return
    state = {
        "format": SEED_STATE_FORMAT,
        "identity": identity,
        "seed": seed,
        "trainer": trainer.state_dict(),
        "rng": ranks[0]["rng"],
        "cuda_rng": ranks[0]["cuda_rng"],
        "ranks": ranks,
        "losses": losses,
        "checks": [asdict(check) for check in checks],
        "seconds": seconds,
    }
    torch_save(state, path)


def load_seed_state(
    path: Path,
    identity: dict,
    defaults: dict,
    seed: int,
    trainer: StudentTrainer,
    device: torch.device,
) -> tuple[list[float], list[AccuracyCheck], float] | None:
    """Restores a saved seed state into ``trainer`` and torch's generators; None when there is
    none, or it belongs to another identity or seed (then it is trained afresh).

    Under torchrun at the world size that saved it, each rank restores its own generators;
    at another world size (or from a one-process state) rank 0's, which are the global batch's
    draws, the same on every rank."""
    if not path.is_file():
        return None
    state = torch_load(path)
    if state.get("format") != SEED_STATE_FORMAT or identity_differences(
        state.get("identity") or {}, identity, defaults
    ):
        logger.info("eval: %s comes from another configuration; seed %d starts afresh", path, seed)
        return None
    if state.get("seed") != seed:
        return None
    trainer.load_state_dict(state["trainer"])
    job = world()
    ranks = state.get("ranks")
    own = ranks[job.rank] if ranks is not None and len(ranks) == job.size else None
    if own is not None:
        trainer.generator.set_state(own["generator"])
    source = state if own is None else own
    rng, cuda_rng = source["rng"], source["cuda_rng"]
    torch.set_rng_state(rng)
    if cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all(cuda_rng)
    return (
        list(state["losses"]),
        [AccuracyCheck(**c) for c in state["checks"]],
        float(state["seconds"]),
    )
