"""``delt compare``: distilled sets against random real images, paired by seed, per student budget.

The question asked of any distilled set (Qin et al., "A Label is Worth a Thousand Images in
Dataset Distillation", NeurIPS 2024; DD-Ranking, github.com/NUS-HPC-AI-Lab/DD-Ranking) is whether
it beats random real images given the same soft labels and the same student compute. For every
set (``--sets``) and every student budget (``--epochs 100,300``: separate schedules, since a
100-epoch cosine is not the first 100 epochs of a 300-epoch one), ``delt compare`` runs
``delt eval`` with one student per seed; with ``--random-real`` it also evaluates, under the same
flags and seeds, the random real images ``delt eval --random-real`` draws (seed s: the same
images, the same student initialization and augmentation draws as seed s of the sets), and with
``--initial`` the real images a set's synthesis started from (a DELT set's first IPC picks of
its ``delt select`` ranking), so that the gain of the synthesis over them shows.

Every evaluation is ``delt eval``'s (:func:`delt.evaluate.evaluate`), with its results file
under ``OUT``: finished seeds are reused, a killed run resumes (at its last student checkpoint),
another protocol is kept aside and comes back with its flags. The pooling (mean ± population std
over seeds) and the paired gains are :mod:`delt.comparison`'s; the paired test is an exact
sign-flip (randomization) test of the per-seed gains (:func:`sign_flip_p`). ``OUT/compare.json``
names the results file of every number; ``OUT/compare.md`` and ``OUT/compare.png`` show them.

Every ``delt eval`` flag of the students' protocol (``--student``, ``--batch-size``, ``--amp``,
...) is a flag of ``delt compare`` too (:data:`EVAL_FLAGS`, generated from
:class:`delt.evaluate.EvalConfig`) and is passed to every evaluation unchanged.

    OUT/sets/<name>-<sha8>/eval-e<E>.json       a set's evaluation at E epochs; diversity.json
    OUT/random-real-ipc<IPC>/eval-e<E>.json     random real images of the sets' IPC
    OUT/initial/<name>-<sha8>/                  a set's starting images (distilled.pt,
                                                manifest.json) and their evaluations
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path

import numpy as np
import torch

from delt.comparison import BASELINE, Comparison, PairedGain, RunRecord, compare, paired_gains
from delt.config import ConfigError, check_int, option
from delt.data import DatasetInfo, load_like
from delt.distilled_set import Manifest, load_distilled, save_distilled
from delt.distributed import barrier, is_main, main_first
from delt.diversity import (
    DiversityConfig,
    centroid_cosine,
    measure_diversity,
    penultimate_features,
)
from delt.eval_results import EvalResult, ResultsFile
from delt.evaluate import EVAL_FORMAT, EvalConfig, EvalContext, evaluate
from delt.io import atomic_open, sha256_file, write_if_changed, write_json
from delt.lock import output_lock
from delt.methods.random_real import draw_random_real
from delt.models import load_checkpoint
from delt.protocols import DEFAULT_PROTOCOL
from delt.runtime import logger, resolve_device, versions
from delt.select import Selection

__all__ = [
    "COMPARE_FORMAT",
    "EVAL_FLAGS",
    "CompareConfig",
    "CompareResult",
    "SetEntry",
    "run_compare",
    "sign_flip_p",
]

COMPARE_FORMAT = "delt-compare-v1"

# EvalConfig fields that delt compare sets itself (per set, per budget); every other field of
# EvalConfig is a flag of delt compare, passed through to each evaluation (EVAL_FLAGS).
# (--labels, a store of one set's seed, is not a flag of a comparison of sets and seeds.)
_OWN_FIELDS = (
    "distilled", "teacher", "data_root", "epochs", "seeds", "random_real", "ipc", "out",
    "stagewise", "stage_schedule", "labels",
)  # fmt: skip


def _forwarded_fields() -> list[tuple[str, object, dataclasses.Field]]:
    hints = typing.get_type_hints(EvalConfig)
    forwarded = []
    for source in dataclasses.fields(EvalConfig):
        if source.name in _OWN_FIELDS:
            continue
        copy = dataclasses.field(default=source.default, metadata=source.metadata)
        forwarded.append((source.name, hints[source.name], copy))
    return forwarded


@dataclass
class _CompareFlags:
    """The flags of ``delt compare`` itself (:class:`CompareConfig` adds ``delt eval``'s) and
    the checks and derivations of the whole config."""

    sets: tuple[str, ...] = option(
        help="distilled-set folders (`delt recover` --out, `delt distill`'s RUN/distilled, "
        "`delt import` --out)",
        identity=False,
    )
    out: str = option(
        "compare", help="output folder: compare.json/.md/.png and the evaluations", identity=False
    )
    seeds: tuple[int, ...] = option(
        (0,),
        help="one student per seed for every set; seed s of random real images is "
        "`delt eval --random-real --seeds s`",
    )
    epochs: tuple[int, ...] = option(
        (300,), help="student budgets, e.g. 100,300: each one its own schedule, its own gains"
    )
    random_real: bool = option(
        False, help="also evaluate random real images of the sets' IPC, paired by seed"
    )
    initial: bool = option(
        False,
        help="also evaluate each set's starting real images (where its manifest records "
        "them): what the synthesis added over them",
    )
    teacher: str | None = option(
        None, help="teacher of every set's soft labels (default: the one the sets' manifests "
        "name, which must be the same)", identity=False,
    )  # fmt: skip
    data_root: str | None = option(
        None, help="folder of the real dataset (default: the dataset's own)", identity=False
    )

    def __post_init__(self) -> None:
        self.sets = tuple(self.sets)
        if not self.sets:
            raise ConfigError("--sets needs at least one distilled-set folder")
        self.epochs = tuple(self.epochs)
        if not self.epochs:
            raise ConfigError("--epochs needs at least one student budget")
        for epochs in self.epochs:
            check_int("--epochs", epochs)
        if len(set(self.epochs)) != len(self.epochs):
            raise ConfigError(f"--epochs lists a budget twice: {','.join(map(str, self.epochs))}")
        resolved = [Path(path).resolve() for path in self.sets]
        for k, path in enumerate(resolved):
            if path in resolved[:k]:
                raise ConfigError(f"--sets names {self.sets[k]} twice")
        # delt eval's own checks of the forwarded flags (and of --seeds), before any work.
        for epochs in self.epochs:
            self.eval_config(self.sets[0], epochs, Path(self.out) / "probe.json")

    def eval_config(
        self, folder: str | Path, epochs: int, results: Path, random_real: bool = False,
        ipc: int | None = None, teacher: str | None = None,
    ) -> EvalConfig:  # fmt: skip
        """The ``delt eval`` config of one evaluation: ``folder`` at ``epochs`` epochs, results to
        ``results``, with every forwarded flag (:data:`EVAL_FLAGS`) as given to ``delt compare``."""
        return EvalConfig(
            distilled=str(folder), teacher=teacher or self.teacher, data_root=self.data_root,
            epochs=epochs, seeds=self.seeds, random_real=random_real, ipc=ipc, out=str(results),
            **{name: getattr(self, name) for name in EVAL_FLAGS},
        )  # fmt: skip


EVAL_FLAGS: tuple[str, ...] = tuple(name for name, _, _ in _forwarded_fields())

CompareConfig = dataclasses.make_dataclass(
    "CompareConfig",
    _forwarded_fields(),
    bases=(_CompareFlags,),
    namespace={
        "__doc__": "Configuration of ``delt compare`` (one field per flag): its own flags and "
        "every flag of ``delt eval``'s protocol (:data:`EVAL_FLAGS`).",
    },
)
CompareConfig.__module__ = __name__


# --------------------------------------------------------------------------------------------
# The paired test


def sign_flip_p(differences: Sequence[float]) -> float | None:
    """The two-sided p-value of an exact sign-flip (randomization) test of paired differences.

    Under the null hypothesis (no difference) each seed's difference is as likely to be
    negative as positive; p is the fraction of the ``2**n`` sign assignments whose mean is at
    least as far from 0 as the observed one. Exact, no normality assumed; with n seeds its
    smallest value is ``2 / 2**n`` (0.25 for three seeds, so three seeds cannot reach p < 0.05).
    Over 16 seeds, 2**16 assignments drawn with a fixed seed stand for all of them.

    Returns:
        None for fewer than two differences.
    """
    values = np.asarray(list(differences), dtype=np.float64)
    n = values.size
    if n < 2:
        return None
    if n > 16:  # 2**16 assignments at most; beyond, a fixed random sample of that many
        signs = np.where(np.random.default_rng(0).random((1 << 16, n)) < 0.5, -1.0, 1.0)
    else:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    observed = abs(values.sum())
    sums = np.abs(signs @ values)
    tolerance = 1e-9 * max(1.0, observed)
    return float(np.mean(sums >= observed - tolerance))


# --------------------------------------------------------------------------------------------
# The sets


@dataclass
class SetEntry:
    """One ``--sets`` folder, read before any work.

    Attributes:
        path: the folder as given.
        label: its name in the tables (the folder's name; a ``distilled`` folder: its run's).
        key: its folder under ``OUT`` (``<name>-<first 8 hex of the set's SHA-256>``).
        manifest: its manifest.
        sha256: the SHA-256 of its ``distilled.pt``.
        initial: why its starting images are not available (``--initial``), else None.
    """

    path: Path
    label: str
    key: str
    manifest: Manifest
    sha256: str
    initial: str | None = None


def _base_label(path: Path) -> str:
    path = path.resolve()
    return path.parent.name if path.name == "distilled" and path.parent.name else path.name


def read_sets(config) -> list[SetEntry]:
    """The ``--sets`` with their manifests, refused where they cannot be compared: sets of
    other datasets or other teachers (without ``--teacher``), the same set twice, and sets of
    other IPCs where they are paired with random real images. One line naming the set."""
    entries: list[SetEntry] = []
    labels: dict[str, int] = {}
    for given in config.sets:
        path = Path(given)
        if not (path / "manifest.json").is_file() or not (path / "distilled.pt").is_file():
            raise FileNotFoundError(
                f"--sets {given}: no distilled set (distilled.pt and manifest.json of `delt "
                "recover`, `delt distill` (RUN/distilled) or `delt import`)"
            )
        manifest = Manifest.load(path)
        sha256 = manifest.distilled_sha256 or sha256_file(path / "distilled.pt")
        base = _base_label(path)
        if base == BASELINE:
            base = f"{BASELINE}-set"
        labels[base] = labels.get(base, 0) + 1
        label = base if labels[base] == 1 else f"{base}-{labels[base]}"
        entries.append(SetEntry(path, label, f"{base}-{sha256[:8]}", manifest, sha256))
    first = entries[0]
    for entry in entries[1:]:
        for earlier in entries[: entries.index(entry)]:
            if earlier.sha256 == entry.sha256:
                raise ConfigError(
                    f"--sets {entry.path}: the same set as {earlier.path} (same distilled.pt)"
                )
        difference = _dataset_difference(first.manifest.dataset, entry.manifest.dataset)
        if difference:
            raise ConfigError(
                f"--sets {entry.path}: {difference} than {first.path}; compare sets of one dataset"
            )
        if config.teacher is None:
            mine, theirs = entry.manifest.teacher, first.manifest.teacher
            if mine.get("sha256") != theirs.get("sha256"):
                raise ConfigError(
                    f"--sets {entry.path}: made with teacher {mine.get('path')} (SHA-256 "
                    f"{str(mine.get('sha256'))[:12]}), {first.path} with {theirs.get('path')} "
                    f"({str(theirs.get('sha256'))[:12]}): its soft labels would differ; pass "
                    "--teacher PATH to label every set with one teacher"
                )
        if config.random_real and entry.manifest.ipc != first.manifest.ipc:
            raise ConfigError(
                f"--sets {entry.path}: IPC {entry.manifest.ipc}, {first.path} IPC "
                f"{first.manifest.ipc}: --random-real pairs sets of one IPC with random real "
                "images of that IPC; compare each IPC apart"
            )
    return entries


def _dataset_difference(first: DatasetInfo, other: DatasetInfo) -> str:
    if other.name != first.name:
        return f"dataset {other.name}, other"
    if other.num_classes != first.num_classes or other.class_names != first.class_names:
        return f"dataset {other.name} with {other.num_classes} classes, other classes"
    if (other.channels, other.resolution) != (first.channels, first.resolution):
        return f"{other.channels}x{other.resolution}x{other.resolution} images, other images"
    return ""


def teacher_path(config, entries: list[SetEntry]) -> str:
    """The teacher of every evaluation: ``--teacher``, else the one the manifests name."""
    if config.teacher is not None:
        return config.teacher
    path = entries[0].manifest.teacher.get("path")
    if not path or not Path(path).is_file():
        raise FileNotFoundError(
            f"--sets {entries[0].path}: the teacher its manifest names ({path}) is gone; pass "
            "--teacher PATH"
        )
    return str(path)


def _initial_images(entry: SetEntry, data_root: str | None):
    """``(images, labels)`` the set's synthesis started from, or the reason there are none: the
    first IPC picks per class of the ``delt select`` ranking its manifest records (DELT's
    initialization: :func:`delt.methods.pixels.recover_pixels`)."""
    manifest = entry.manifest
    if manifest.selection is None:
        return f"its manifest records no starting images ({manifest.method} set)"
    if manifest.stages is not None:
        return "a pdd set: each stage starts from its own images (not recorded as one set)"
    folder = Path(manifest.selection["path"])
    if not (folder / "selection.json").is_file():
        return f"its selection {folder} (recorded in its manifest) is gone"
    selection = Selection.load(folder)
    info, ipc = manifest.dataset, manifest.ipc
    if selection.ipc < ipc or manifest.num_images != ipc * info.num_classes:
        return f"its selection {folder} does not hold its {ipc} images per class"
    root = data_root or manifest.config.get("data_root") or selection.meta.get("data_root")
    dataset = load_like(info, "train", root)
    selection.check_indices(dataset.targets, info.num_classes, folder / "selection.json")
    picks = [selection.indices[c][j] for c in range(info.num_classes) for j in range(ipc)]
    labels = torch.arange(info.num_classes).repeat_interleave(ipc)
    return dataset.images(picks), labels


def _write_initial_set(entry: SetEntry, folder: Path, data_root: str | None) -> str | None:
    """Writes the set's starting images as a distilled set in ``folder`` (once; rank 0);
    returns why there are none instead, or None."""
    if (folder / "distilled.pt").is_file() and (folder / "manifest.json").is_file():
        return None
    found = _initial_images(entry, data_root)
    if isinstance(found, str):
        return found
    images, labels = found
    _, set_labels, _ = load_distilled(entry.path)
    if not torch.equal(set_labels, labels):
        return "its images are not in class-major selection order"
    manifest = dataclasses.replace(
        entry.manifest,
        method=f"{entry.manifest.method}-initial",
        iterations_per_image=[0] * len(labels),
        synthesis_seconds=0.0,
        files={"distilled": "distilled.pt"},
        distilled_sha256=None,
        images_dtype="float32",
        extra={**entry.manifest.extra, "initial_images_of": str(entry.path)},
        versions=versions(),
    )
    if is_main():
        save_distilled(folder, images.float(), labels, manifest)
    return None


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class Scored:
    """One evaluated set (a ``--sets`` folder, random real images, starting images) at one
    budget: its label, results file and per-seed best top-1 accuracy."""

    label: str
    kind: str  # "set", "baseline" (random real images), "initial"
    eval_path: Path
    accuracies: dict[int, float]
    result: EvalResult


@dataclass
class CompareResult:
    """What ``delt compare`` wrote: ``OUT/compare.json`` (``document``), ``.md``, ``.png``."""

    out: Path
    document: dict
    markdown: str


def run_compare(config) -> CompareResult:
    """Runs ``delt compare`` (holds ``OUT/.lock``; each evaluation also locks its folder)."""
    with output_lock(config.out) as lock:
        lock.sweep(Path(config.out), recursive=False)
        return _run_compare(config)


def _run_compare(config) -> CompareResult:
    out = Path(config.out)
    entries = read_sets(config)
    teacher = teacher_path(config, entries)
    ipc = entries[0].manifest.ipc
    # Refused now, not after hours of training: the flags against the data (one context holds
    # the teacher, the test split and the student), and random real images of the sets' IPC.
    EvalContext.from_config(config.eval_config(entries[0].path, config.epochs[0], out / "x.json"))
    if config.random_real:
        _check_random_real(config, entries, teacher)
    if config.initial:
        with main_first():
            for entry in entries:
                entry.initial = _write_initial_set(
                    entry, out / "initial" / entry.key, config.data_root
                )
                if entry.initial is not None:
                    logger.info("compare: %s: no starting images (%s)", entry.path, entry.initial)
    diversity = _diversities(config, entries, teacher, out)
    budgets = []
    for epochs in sorted(config.epochs):
        scored = []
        for entry in entries:
            results = out / "sets" / entry.key / f"eval-e{epochs}.json"
            scored.append(_score(config, entry.label, "set", entry.path, epochs, results, teacher))
        if config.random_real:
            folder = out / f"random-real-ipc{ipc}"
            scored.append(_score(config, BASELINE, "baseline", folder, epochs,
                                 folder / f"eval-e{epochs}.json", teacher, ipc))  # fmt: skip
        for entry in entries if config.initial else []:
            if entry.initial is None:
                folder = out / "initial" / entry.key
                scored.append(_score(config, f"{entry.label} (initial)", "initial", folder,
                                     epochs, folder / f"eval-e{epochs}.json", teacher))  # fmt: skip
        budgets.append((epochs, scored))
    document = compare_document(config, entries, budgets, diversity, teacher)
    markdown = compare_markdown(document)
    if is_main():
        write_json(out / "compare.json", document)
        write_if_changed(out / "compare.md", markdown.encode())
        plot_compare(document, out / "compare.png")
    barrier()
    return CompareResult(out, document, markdown)


def _check_random_real(config, entries: list[SetEntry], teacher: str) -> None:
    """Every class of the training split holds the sets' IPC (random real images of it)."""
    ipc = entries[0].manifest.ipc
    info = load_checkpoint(teacher).info
    root = config.data_root or entries[0].manifest.config.get("data_root")
    targets = load_like(info, "train", root).targets
    counts = torch.bincount(targets, minlength=info.num_classes)
    short = [c for c in range(info.num_classes) if int(counts[c]) < ipc]
    if short:
        c = short[0]
        raise ConfigError(
            f"--random-real: {entries[0].path} has IPC {ipc}, but class {c} "
            f"({info.class_names[c]!r}) of the training split has only {int(counts[c])} images: "
            "no random real images of that IPC to pair with"
        )


def _score(
    config, label: str, kind: str, folder: Path, epochs: int, results: Path, teacher: str,
    ipc: int | None = None,
) -> Scored:  # fmt: skip
    """``delt eval`` of one set at one budget (its caching: finished seeds are not retrained).

    A ``--sets`` folder's own ``eval.json`` (``delt eval``'s default, ``delt distill``'s) that
    holds this very evaluation (the same identity: flags, teacher, set, data) of exactly these
    seeds is used where it is; anything else is evaluated into ``results`` under ``OUT``."""
    eval_config = config.eval_config(folder, epochs, results, kind == "baseline", ipc, teacher)
    if kind == "set":
        own = _own_evaluation(eval_config, Path(folder) / "eval.json")
        if own is not None:
            eval_config = dataclasses.replace(eval_config, out=str(own))
    result = evaluate(eval_config)
    logger.info(
        "compare: %s, %d epochs: %.2f ± %.2f%%%s (%s)", label, epochs, result.accuracy_mean,
        result.accuracy_std, " (cached)" if result.reused else "", result.path,
    )  # fmt: skip
    accuracies = {seed.seed: seed.best_accuracy for seed in result.seeds}
    return Scored(label, kind, result.path, accuracies, result)


def _own_evaluation(eval_config: EvalConfig, path: Path) -> Path | None:
    """``path`` where it holds ``eval_config``'s evaluation of exactly its seeds, in their
    order (then ``delt eval`` reuses it without writing), else None."""
    if not path.is_file():
        return None
    probe = dataclasses.replace(eval_config, out=str(path))
    context = EvalContext.from_config(probe)
    results = ResultsFile.open(path, EVAL_FORMAT, context.identity(), context.identity_defaults())
    if results.document is None or results.needs_write or results.legacy:
        return None
    seeds = [int(seed["seed"]) for seed in results.document["seeds"]]
    return path if seeds == list(eval_config.seeds) and results.document["complete"] else None


def _diversities(config, entries: list[SetEntry], teacher: str, out: Path) -> dict[str, dict]:
    """``delt diversity`` (with the compare's teacher) of every set and of the starting images,
    and its metric over each seed's random real images; label → ``{"mean", "file"}``."""
    found: dict[str, dict] = {}
    with main_first():  # rank 0 measures; the others read the cached files
        folders = [(e.label, e.path, out / "sets" / e.key) for e in entries]
        folders += [(f"{e.label} (initial)", out / "initial" / e.key, out / "initial" / e.key)
                    for e in entries if config.initial and e.initial is None]  # fmt: skip
        for label, folder, results in folders:
            measured = measure_diversity(
                DiversityConfig(distilled=str(folder), model=teacher,
                                out=str(results / "diversity.json"), device=config.device)
            )  # fmt: skip
            found[label] = {"mean": measured.mean, "std": measured.std, "file": str(measured.path)}
    if config.random_real:
        found[BASELINE] = _random_real_diversity(config, entries, teacher)
    return found


def _random_real_diversity(config, entries: list[SetEntry], teacher: str) -> dict:
    """DELT's diversity (:mod:`delt.diversity`) of each seed's random real images, averaged."""
    checkpoint = load_checkpoint(teacher)
    info = checkpoint.info
    device = resolve_device(config.device)
    model = checkpoint.model.to(device)
    root = config.data_root or entries[0].manifest.config.get("data_root")
    train = load_like(info, "train", root)
    per_seed = {}
    for seed in config.seeds:
        images, labels, _ = draw_random_real(train, entries[0].manifest.ipc, seed)
        features = penultimate_features(model, images.to(device))
        values = centroid_cosine(features, labels, info.num_classes)
        per_seed[seed] = float(values[~torch.isnan(values)].mean())
    mean = float(np.mean(list(per_seed.values())))
    return {"mean": mean, "std": float(np.std(list(per_seed.values()))), "per_seed": per_seed,
            "file": None}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The results


def budget_comparison(
    entries: list[SetEntry], scored: list[Scored], diversity: dict[str, dict]
) -> Comparison:
    """One budget's evaluations as :class:`delt.comparison.Comparison`: one run per (set,
    seed), pooled by set over seeds and paired with random real images by seed."""
    by_label = {entry.label: entry for entry in entries}
    runs = []
    for score in scored:
        entry = by_label.get(score.label.removesuffix(" (initial)"))
        manifest = entry.manifest if entry is not None else None
        optimized = score.kind == "set" and manifest is not None
        for seed, accuracy in score.accuracies.items():
            report = {
                "method": score.label,
                "dataset": score.result.document["dataset"],
                "ipc": score.result.document["ipc"],
                "accuracy_mean": accuracy,
                "accuracy_std": 0.0,
                "diversity": diversity.get(score.label, {}).get("mean", math.nan),
                "synthesis_seconds": float(manifest.synthesis_seconds) if optimized else 0.0,
                "image_iterations": manifest.image_iterations if optimized else 0,
            }
            runs.append(RunRecord(score.label, seed, report))
    return compare(runs)


def _gain_entry(gain: PairedGain) -> dict:
    return {**gain.to_dict(), "p_sign_flip": sign_flip_p(list(gain.gains.values()))}


def compare_document(config, entries, budgets, diversity, teacher) -> dict:
    """``compare.json``: per set its manifest's facts; per budget the pooled rows, the gains
    over random real images and over the starting images (each with its sign-flip p), and
    every evaluation's results file with its per-seed accuracies."""
    sets = []
    for entry in entries:
        sets.append({
            "label": entry.label, "path": str(entry.path), "method": entry.manifest.method,
            "dataset": entry.manifest.dataset.name, "ipc": entry.manifest.ipc,
            "distilled_sha256": entry.sha256,
            "synthesis_seconds": float(entry.manifest.synthesis_seconds),
            "image_iterations": entry.manifest.image_iterations,
            "diversity": diversity.get(entry.label),
            "initial": None if not config.initial else (
                {"folder": str(Path(config.out) / "initial" / entry.key)}
                if entry.initial is None else {"missing": entry.initial}),
        })  # fmt: skip
    budget_documents = []
    for epochs, scored in budgets:
        comparison = budget_comparison(entries, scored, diversity)
        by_label = {score.label: score for score in scored}
        synthesis = []
        for entry in entries:
            initial = by_label.get(f"{entry.label} (initial)")
            if initial is None:
                continue
            ipc = entry.manifest.ipc
            accuracies = {
                (entry.label, ipc, seed): accuracy
                for seed, accuracy in by_label[entry.label].accuracies.items()
            }
            accuracies |= {(initial.label, ipc, s): a for s, a in initial.accuracies.items()}
            for gain in paired_gains(accuracies, baseline=initial.label):
                synthesis.append({**_gain_entry(gain), "over": initial.label})
        budget_documents.append({
            "epochs": epochs,
            "rows": comparison.rows,
            "gains": [_gain_entry(gain) for gain in comparison.gains],
            "synthesis_gains": synthesis,
            "evaluations": [
                {"label": s.label, "kind": s.kind, "eval": str(s.eval_path),
                 "accuracies": dict(sorted(s.accuracies.items())),
                 "mean": s.result.accuracy_mean, "std": s.result.accuracy_std}
                for s in scored
            ],
        })  # fmt: skip
    protocol = {name: getattr(config, name) for name in EVAL_FLAGS}
    return {
        "format": COMPARE_FORMAT,
        "teacher": teacher,
        "seeds": list(config.seeds),
        "epochs": sorted(config.epochs),
        "random_real": config.random_real,
        "random_real_diversity": diversity.get(BASELINE),
        "initial": config.initial,
        "eval_flags": {key: list(v) if isinstance(v, tuple) else v for key, v in protocol.items()},
        "paired_test": "exact two-sided sign-flip (randomization) test of the per-seed gains",
        "sets": sets,
        "budgets": budget_documents,
        "versions": versions(),
    }


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _protocol_line(flags: dict) -> str:
    """``--protocol NAME`` and the delt eval flags given off their defaults beside it."""
    defaults = {
        f.name: f.default for f in dataclasses.fields(EvalConfig) if f.default is not MISSING
    }
    given = []
    for name, value in flags.items():
        default = defaults.get(name)
        if name == "protocol" or value == default or (value in ((), []) and not default):
            continue
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            given.append(f"`{option}`" if value else f"`--no-{name.replace('_', '-')}`")
        else:
            shown = ",".join(map(str, value)) if isinstance(value, list | tuple) else value
            given.append(f"`{option} {shown}`")
    protocol = f"`--protocol {flags.get('protocol') or DEFAULT_PROTOCOL}`"
    return protocol + (f" with {', '.join(given)}" if given else "")


def compare_markdown(document: dict) -> str:
    """``compare.md``: one table per student budget, then where every number comes from."""
    lines = ["# delt compare", ""]
    sets = {entry["label"]: entry for entry in document["sets"]}
    seeds = ",".join(map(str, document["seeds"]))
    lines.append(f"Teacher `{document['teacher']}`; seeds {seeds}; accuracy: best top-1 (%) "
                 "mean ± population std over seeds; gains paired by seed (points); p: "
                 f"{document['paired_test']}.")  # fmt: skip
    lines += ["", f"Evaluation: {_protocol_line(document['eval_flags'])}."]
    for budget in document["budgets"]:
        gains = {gain["method"]: gain for gain in budget["gains"]}
        synthesis = {gain["method"]: gain for gain in budget["synthesis_gains"]}
        lines += ["", f"## {budget['epochs']} student epochs", "",
                  f"| set | method | IPC | accuracy (%) | gain over {BASELINE} | p "
                  "| gain over its starting images | p | diversity | synthesis s "
                  "| image-iterations |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for row in budget["rows"]:
            label = row["method"]
            gain, added = gains.get(label), synthesis.get(label)
            method = sets[label]["method"] if label in sets else (
                BASELINE if label == BASELINE else "initial")  # fmt: skip
            lines.append(
                f"| {label} | {method} | {row['ipc']} | {row['accuracy_mean']:.2f} ± "
                f"{row['accuracy_std']:.2f} | "
                + (f"{gain['mean']:+.2f} ± {gain['std']:.2f} | {_p(gain['p_sign_flip'])} | "
                   if gain else "– | – | ")
                + (f"{added['mean']:+.2f} ± {added['std']:.2f} | {_p(added['p_sign_flip'])} | "
                   if added else "– | – | ")
                + f"{row['diversity']:.4f} | {row['synthesis_seconds']:.1f} "
                f"| {row['image_iterations']:,} |"
            )  # fmt: skip
    missing = [(e["label"], e["initial"]["missing"]) for e in document["sets"]
               if e["initial"] and "missing" in e["initial"]]  # fmt: skip
    if missing:
        lines += ["", "No starting images to compare with:", ""]
        lines += [f"- {label}: {reason}" for label, reason in missing]
    lines += ["", "## Sources", ""]
    for budget in document["budgets"]:
        for evaluation in budget["evaluations"]:
            lines.append(
                f"- {evaluation['label']}, {budget['epochs']} epochs: `{evaluation['eval']}`"
            )
    if document["random_real_diversity"] is not None:
        lines.append(f"- {BASELINE}, diversity: the mean over each seed's draw "
                     "(`compare.json`, random_real_diversity.per_seed)")  # fmt: skip
    for label, entry in sets.items():
        if entry["diversity"] is not None:
            lines.append(f"- {label}, diversity: `{entry['diversity']['file']}`; synthesis "
                         f"seconds, image-iterations: `{entry['path']}/manifest.json`")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_compare(document: dict, path: str | Path) -> None:
    """``compare.png``: each set's gain over random real images (bars: mean, error bars: the
    seeds' population std, dots: the seeds) grouped by student budget, and that gain against
    the set's synthesis seconds; without ``--random-real``, the accuracies instead."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    budgets = document["budgets"]
    paired = any(budget["gains"] for budget in budgets)
    labels = [e["label"] for e in document["sets"]]
    # Starting images (--initial) have a gain over random real images too: drawn after the sets.
    labels += list(
        dict.fromkeys(g["method"] for b in budgets for g in b["gains"] if g["method"] not in labels)
    )
    seconds = {e["label"]: e["synthesis_seconds"] for e in document["sets"]}
    figure, (bars, cost) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(budgets))
    colors = plt.get_cmap("tab10")
    for k, budget in enumerate(budgets):
        if paired:
            found = {g["method"]: g for g in budget["gains"]}
            values = {label: (g["mean"], g["std"], list(g["gains"].values()))
                      for label, g in found.items()}  # fmt: skip
        else:
            values = {e["label"]: (e["mean"], e["std"], list(e["accuracies"].values()))
                      for e in budget["evaluations"] if e["kind"] == "set"}  # fmt: skip
        shown = [label for label in labels if label in values]
        positions = np.array([labels.index(label) for label in shown], dtype=float)
        positions += (k - (len(budgets) - 1) / 2) * width
        color = colors(k % 10)
        bars.bar(positions, [values[label][0] for label in shown], width,
                 yerr=[values[label][1] for label in shown], capsize=3, color=color, alpha=0.75,
                 label=f"{budget['epochs']} epochs")  # fmt: skip
        for position, label in zip(positions, shown, strict=True):
            dots = values[label][2]
            bars.scatter([position] * len(dots), dots, s=10, color="black", zorder=3)
            if paired and label in seconds:
                cost.errorbar(seconds[label], values[label][0], yerr=values[label][1], fmt="o",
                              capsize=3, color=color)  # fmt: skip
                cost.annotate(label, (seconds[label], values[label][0]), fontsize=7,
                              xytext=(4, 2), textcoords="offset points")  # fmt: skip
    bars.set_xticks(range(len(labels)), labels, fontsize=8)
    bars.axhline(0.0, color="gray", linewidth=0.8)
    what = f"gain over {BASELINE} (points, paired by seed)" if paired else "best top-1 (%)"
    bars.set_ylabel(what)
    bars.set_title("per student budget: mean ± std over seeds (dots: seeds)", fontsize=10)
    bars.grid(axis="y", alpha=0.3)
    bars.legend(fontsize=8)
    cost.set_xscale("symlog", linthresh=1.0)
    cost.axhline(0.0, color="gray", linewidth=0.8)
    cost.set_xlabel("synthesis seconds (the set's manifest)")
    cost.set_ylabel(f"gain over {BASELINE} (points)")
    cost.set_title("gain against synthesis cost (colour: budget)", fontsize=10)
    cost.grid(alpha=0.3)
    if not paired:
        cost.text(0.5, 0.5, "no --random-real: no gains", ha="center", transform=cost.transAxes)
    figure.tight_layout()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)
