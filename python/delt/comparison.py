"""Comparing methods over finished runs: the runs pooled by method, each method's gain over a
baseline (random real images) paired by seed, and the other evaluations of the same sets pooled
by name and training protocol; their Markdown tables, JSON document and gains chart.

A run is a :class:`RunRecord`: the method variant that made it (``delt-lr0.05``: a name of the
caller's, pooled apart from ``delt``), its seed, its ``report.json``
(:data:`delt.report.REPORT_KEYS`) and its folder (``delt distill``'s). :func:`compare` reads a
list of them into a :class:`Comparison`:

- ``rows``: :func:`delt.report.pool_reports` over the runs, by (dataset, IPC, method variant);
- ``gains``: :func:`paired_gains`, per (IPC, method): for every seed that the method and the
  baseline both ran, the method's best top-1 accuracy minus the baseline's (points), then the
  mean and population std of those differences. Pairing by seed removes what the seed changes in
  both (the evaluation's student initialization and augmentation draws);
- ``evaluations``: :func:`other_evaluations`, the runs' other evaluations of their sets
  (``RUN/distilled/eval-NAME.json`` of ``delt eval --out``: another student, a shorter student
  budget, ShufflePatches), pooled by (IPC, NAME, method) and paired with the baseline's
  evaluation of the same NAME. A NAME must mean one training protocol at an IPC
  (:func:`evaluation_protocol`), or the comparison is refused (:class:`ProtocolMismatchError`).

``benchmarks/quality/run.py`` writes its ``results.md`` / ``results.json`` /
``results-gains.png`` with it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from delt.config import config_diff, flag
from delt.eval_results import mean_std
from delt.evaluate import EvalConfig
from delt.io import atomic_open
from delt.report import markdown_table, pool_reports
from delt.student_trainer import default_batch_size

__all__ = [
    "BASELINE",
    "NOT_PROTOCOL",
    "Comparison",
    "OtherEvaluation",
    "PairedGain",
    "ProtocolMismatchError",
    "RunRecord",
    "compare",
    "describe_protocol",
    "evaluation_protocol",
    "other_evaluations",
    "paired_gains",
    "plot_gains",
]

BASELINE = "random-real"

# A run's seed: its number, or the name of a run that is not one seed's (``once``: one set that
# every evaluation seed trains on).
Seed = int | str


class ProtocolMismatchError(ValueError):
    """Two evaluation files of one NAME at one IPC were trained by different protocols."""


@dataclass(frozen=True)
class RunRecord:
    """One finished run.

    Attributes:
        method: the method variant the run is pooled under (``delt``, ``delt-lr0.05``).
        seed: its seed (or its folder's name where it is not one seed's).
        report: its ``report.json`` (:data:`delt.report.REPORT_KEYS`).
        folder: its ``delt distill`` folder, where its other evaluations are
            (``distilled/eval-NAME.json``); None for a run known only from a log.
    """

    method: str
    seed: Seed
    report: dict
    folder: Path | None = None


@dataclass(frozen=True)
class PairedGain:
    """A method's gain over the baseline at one IPC, paired by seed.

    Attributes:
        gains: seed → the method's accuracy minus the baseline's of that seed (points), by seed.
        mean, std: over ``gains`` (population std: 0 for one seed).
    """

    ipc: int
    method: str
    gains: dict[Seed, float]
    mean: float
    std: float

    def to_dict(self) -> dict:
        """The JSON form: ``ipc``, ``method``, ``gains``, ``mean``, ``std``."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OtherEvaluation:
    """The evaluations of one NAME (``eval-NAME.json``) of one method's sets at one IPC.

    Attributes:
        evaluation: NAME.
        protocol: the training protocol in words (:func:`describe_protocol`).
        accuracies: seed → best top-1 accuracy (%), by seed.
        mean, std: over ``accuracies`` (population std).
        gain: over the baseline's evaluation of the same NAME, paired by seed; None where the
            baseline has no such evaluation of a common seed (or this is the baseline).
    """

    evaluation: str
    protocol: str
    ipc: int
    method: str
    accuracies: dict[Seed, float]
    mean: float
    std: float
    gain: PairedGain | None = None

    def to_dict(self) -> dict:
        """The JSON form; ``gains``, ``gain_mean`` and ``gain_std`` only where paired."""
        document = dataclasses.asdict(self)
        del document["gain"]
        if self.gain is not None:
            document.update(
                gains=dict(self.gain.gains), gain_mean=self.gain.mean, gain_std=self.gain.std
            )
        return document


def paired_gains(
    accuracies: Mapping[tuple[str, int, Seed], float], baseline: str = BASELINE
) -> list[PairedGain]:
    """Each method's gain over ``baseline`` paired by (IPC, seed).

    Args:
        accuracies: (method, IPC, seed) → accuracy (%).

    Returns:
        One :class:`PairedGain` per (IPC, method) with at least one seed that ``baseline`` also
        has at that IPC, in the order the pairs first occur in ``accuracies``; methods and seeds
        without a baseline run are left out.
    """
    rows: dict[tuple[int, str], dict[Seed, float]] = {}
    for (method, ipc, seed), value in accuracies.items():
        if method != baseline and (baseline, ipc, seed) in accuracies:
            rows.setdefault((ipc, method), {})[seed] = value - accuracies[(baseline, ipc, seed)]
    return [
        PairedGain(ipc, method, dict(sorted(gains.items())), *mean_std(list(gains.values())))
        for (ipc, method), gains in rows.items()
    ]


def run_accuracies(runs: Sequence[RunRecord]) -> dict[tuple[str, int, Seed], float]:
    """(method, IPC, seed) → the run's best top-1 accuracy (``accuracy_mean``), for
    :func:`paired_gains`; of two runs with the same key the later one counts."""
    return {(run.method, run.report["ipc"], run.seed): run.report["accuracy_mean"] for run in runs}


# Fields of an evaluation's identity config that do not change its training protocol, or that
# legitimately differ between the runs pooled under one NAME: the IPC (checked per IPC), the
# requested --student-width (the resolved student_kwargs stay), the memory format, whether the
# folder held a set or --random-real drew one, and the random stream of augmenting workers (0 on
# a CPU, N on a GPU: another draw, as another seed is).
NOT_PROTOCOL = ("ipc", "student_width", "channels_last", "random_real", "augmentation")


@functools.cache
def _eval_defaults() -> dict:
    """``delt eval``'s default of every field of an evaluation's identity config (computed once;
    callers copy before changing it): its protocol settings as ``--protocol delt`` resolves them."""
    resolved = EvalConfig(distilled="")
    return {
        f.name: getattr(resolved, f.name)
        for f in dataclasses.fields(EvalConfig)
        if f.metadata.get("identity", True) and f.default is not dataclasses.MISSING
    }


def evaluation_protocol(document: dict) -> dict:
    """The training protocol of an eval document (``delt eval``'s eval.json): its identity
    config (the resolved student, its kwargs and batch size included), with ``delt eval``'s
    default for a field it lacks (a file written before the flag existed, or ShufflePatches
    off), less :data:`NOT_PROTOCOL` and the seeds."""
    defaults = {key: value for key, value in _eval_defaults().items() if key != "seeds"}
    protocol = {**defaults, **document["identity"]["config"]}
    for name in NOT_PROTOCOL:
        protocol.pop(name, None)
    return protocol


def describe_protocol(protocol: dict, ipc: int, num_images: int) -> str:
    """A protocol (:func:`evaluation_protocol`) in words: the student with its width, epochs and
    test interval, then every setting that differs from ``delt eval``'s defaults, e.g.
    ``"convnet4 w64, 300 epochs, tested every 10, ShufflePatches 2, min crop 0.5, RandAugment
    off"``; a batch size other than the IPC's default (``num_images`` caps it) is named too."""
    defaults = _eval_defaults()
    kwargs = protocol.get("student_kwargs") or {}
    model = "".join(
        f" w{value}" if key == "width" else f" {key}={value}" for key, value in kwargs.items()
    )
    parts = [
        f"{protocol['student']}{model}",
        f"{protocol['epochs']} epochs",
        f"tested every {protocol['eval_every']}",
    ]
    if protocol.get("shuffle_patches"):
        parts.append(f"ShufflePatches {protocol['shuffle_patches']}")
    if protocol["min_crop"] != defaults["min_crop"]:
        parts.append(f"min crop {protocol['min_crop']:g}")
    ops, magnitude = protocol["randaugment_ops"], protocol["randaugment_magnitude"]
    if ops == 0 and defaults["randaugment_ops"] != 0:
        parts.append("RandAugment off")
    elif (ops, magnitude) != (defaults["randaugment_ops"], defaults["randaugment_magnitude"]):
        parts.append(f"RandAugment rand-m{magnitude}-n{ops}")
    if protocol["cutmix_beta"] != defaults["cutmix_beta"]:
        beta = protocol["cutmix_beta"]
        parts.append("CutMix off" if beta == 0 else f"CutMix beta {beta:g}")
    if protocol["hard_labels"]:
        parts.append("hard labels")
    for name in ("temperature", "lr", "weight_decay", "amp"):
        if protocol[name] != defaults[name]:
            parts.append(f"{flag(name)} {protocol[name]}")
    classes = max(1, round(num_images / ipc))
    if protocol["batch_size"] != default_batch_size(ipc, classes, num_images):
        parts.append(f"batch {protocol['batch_size']}")
    if protocol.get("stagewise"):
        parts.append(f"stage-wise ({protocol['stage_schedule']})")
    # Any other field (one added to delt eval later) that differs from its default, by flag.
    described = {"student", "student_kwargs", "epochs", "eval_every", "shuffle_patches",
                 "min_crop", "randaugment_ops", "randaugment_magnitude", "cutmix_beta",
                 "hard_labels", "temperature", "lr", "weight_decay", "amp", "batch_size",
                 "stagewise", "stage_schedule"}  # fmt: skip
    parts += [
        f"{flag(key)} {value}"
        for key, value in protocol.items()
        if key not in described and (key not in defaults or value != defaults[key])
    ]
    return ", ".join(parts)


def other_evaluations(runs: Sequence[RunRecord], baseline: str = BASELINE) -> list[OtherEvaluation]:
    """The runs' other evaluations of their sets: every complete ``FOLDER/distilled/
    eval-NAME.json`` beside the run's own ``eval.json`` (runs without a folder have none),
    pooled by (IPC, NAME, method), each paired by seed with ``baseline``'s evaluation of the
    same NAME (:func:`paired_gains`).

    A NAME is one evaluation only where every file of that NAME at an IPC has the same training
    protocol (:func:`evaluation_protocol`: the student and its width, epochs, test interval,
    augmentation, loss, optimizer, batch size, ...); the first file read sets it.

    Returns:
        Sorted by IPC, NAME, then the methods' order of first appearance in ``runs``.

    Raises:
        ProtocolMismatchError: a file whose protocol differs from the first of its NAME, naming
            both files and the differences.
    """
    found: dict[tuple[int, str, str], dict[Seed, float]] = {}
    protocols: dict[tuple[int, str], tuple[dict, str, Path]] = {}
    for run in runs:
        if run.folder is None:
            continue
        for path in sorted((Path(run.folder) / "distilled").glob("eval-*.json")):
            document = json.loads(path.read_text())
            if not document.get("complete"):
                continue
            ipc, name = document["ipc"], path.stem[len("eval-") :]
            protocol = evaluation_protocol(document)
            if (ipc, name) not in protocols:  # the first file of a NAME sets its protocol
                described = describe_protocol(protocol, ipc, document["num_images"])
                protocols[(ipc, name)] = (protocol, described, path)
            first = protocols[(ipc, name)]
            if first[0] != protocol:
                described = describe_protocol(protocol, ipc, document["num_images"])
                differences = "; ".join(config_diff(first[0], protocol))
                raise ProtocolMismatchError(
                    f"{path}: protocol {described!r} differs from {first[2]}'s {first[1]!r} "
                    f"({differences}); an evaluation name must mean one protocol"
                )
            entry = found.setdefault((ipc, name, run.method), {})
            for seed in document["seeds"]:
                entry[seed["seed"]] = seed["best_accuracy"]
    # The gains: paired_gains over each evaluation name's accuracies, as for the runs' own.
    paired: dict[tuple[int, str, str], PairedGain] = {}
    for name in dict.fromkeys(name for _, name in protocols):
        accuracies = {(method, ipc, seed): accuracy
                      for (ipc, n, method), by_seed in found.items() if n == name
                      for seed, accuracy in by_seed.items()}  # fmt: skip
        for gain in paired_gains(accuracies, baseline):
            paired[(gain.ipc, name, gain.method)] = gain
    rows = [
        OtherEvaluation(
            evaluation=name,
            protocol=protocols[(ipc, name)][1],
            ipc=ipc,
            method=method,
            accuracies=dict(sorted(accuracies.items())),
            mean=float(np.mean(list(accuracies.values()))),
            std=float(np.std(list(accuracies.values()))),
            gain=paired.get((ipc, name, method)),
        )
        for (ipc, name, method), accuracies in found.items()
    ]
    order: dict[str, int] = {}
    for run in runs:
        order.setdefault(run.method, len(order))
    rows.sort(key=lambda r: (r.ipc, r.evaluation, order.get(r.method, len(order))))
    return rows


@dataclass
class Comparison:
    """Runs compared (:func:`compare`).

    Attributes:
        runs: the runs, in the order given.
        rows: :func:`delt.report.pool_reports`' rows, pooled by method variant.
        gains: each method's :class:`PairedGain` over ``baseline`` (empty when not paired).
        evaluations: :func:`other_evaluations`.
    """

    runs: list[RunRecord]
    rows: list[dict]
    gains: list[PairedGain] = field(default_factory=list)
    evaluations: list[OtherEvaluation] = field(default_factory=list)
    baseline: str = BASELINE

    def markdown(self) -> str:
        """The tables: the pooled runs (:func:`delt.report.markdown_table`), the gains over the
        baseline per seed, and the other evaluations (the last two where there are any)."""
        lines = [markdown_table(self.rows)]
        if self.gains:
            lines += ["", f"| IPC | method | gain over {self.baseline}, per seed (points) "
                      "| mean ± std |", "|---:|---|---|---:|"]  # fmt: skip
            for gain in self.gains:
                per_seed = ", ".join(f"{seed}: {g:+.2f}" for seed, g in gain.gains.items())
                lines.append(f"| {gain.ipc} | {gain.method} | {per_seed} "
                             f"| {gain.mean:+.2f} ± {gain.std:.2f} |")  # fmt: skip
        if self.evaluations:
            lines += ["", "Other evaluations of the same sets (`RUN/distilled/eval-NAME.json`):",
                      "", "| IPC | evaluation | protocol | method | seeds | accuracy (%) "
                      f"| gain over {self.baseline} (points) |",
                      "|---:|---|---|---|---:|---:|---:|"]  # fmt: skip
            for row in self.evaluations:
                gain = f"{row.gain.mean:+.2f} ± {row.gain.std:.2f}" if row.gain is not None else "–"
                lines.append(f"| {row.ipc} | {row.evaluation} | {row.protocol} | "
                             f"{row.method} | {len(row.accuracies)} | {row.mean:.2f} ± "
                             f"{row.std:.2f} | {gain} |")  # fmt: skip
        return "\n".join(lines).rstrip("\n") + "\n"

    def document(self) -> dict:
        """The JSON form: ``rows``, ``gains``, ``evaluations`` and ``runs`` (per run: its method
        variant, seed, IPC, accuracy, diversity, synthesis seconds and image-iterations)."""
        keys = ("ipc", "accuracy_mean", "diversity", "synthesis_seconds", "image_iterations")
        return {
            "rows": self.rows,
            "gains": [gain.to_dict() for gain in self.gains],
            "evaluations": [row.to_dict() for row in self.evaluations],
            "runs": [{"method": run.method, "seed": run.seed, **{k: run.report[k] for k in keys}}
                     for run in self.runs],
        }  # fmt: skip


def compare(
    runs: Sequence[RunRecord], baseline: str = BASELINE, pair_by_seed: bool = True
) -> Comparison:
    """Pools ``runs`` by method variant, pairs each with ``baseline`` by seed (unless
    ``pair_by_seed`` is False: runs whose seeds are not the sets' own, such as one set
    evaluated with several seeds) and pools their other evaluations.

    Raises:
        ProtocolMismatchError: as :func:`other_evaluations`.
    """
    runs = list(runs)
    rows = pool_reports([{**run.report, "method": run.method} for run in runs])
    gains = paired_gains(run_accuracies(runs), baseline) if pair_by_seed else []
    return Comparison(runs, rows, gains, other_evaluations(runs, baseline), baseline)


def _count(value: float) -> str:
    """``4000000`` → ``"4M"``, ``340000`` → ``"340k"``: image-iterations on a chart."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.0f}"


def plot_gains(
    gains: Sequence[PairedGain],
    rows: Sequence[dict],
    path: str | Path,
    title: str = "",
    baseline: str = BASELINE,
) -> None:
    """A PNG chart, per IPC (a row of two panels): each method's gain over ``baseline`` paired
    by seed (bars: the mean, error bars: the seeds' population std, dots: the seeds; under each
    bar the method's synthesis seconds and image-iterations), and that gain against its
    synthesis seconds (log axis). ``rows``: :func:`delt.report.pool_reports`' (synthesis seconds
    and image-iterations, the mean over a method's runs). A method without a baseline run of a
    common seed has no gain: it is named in its IPC's gain panel, not drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    ipcs = list(dict.fromkeys([*(r["ipc"] for r in rows), *(g.ipc for g in gains)]))
    methods = list(dict.fromkeys([*(r["method"] for r in rows), *(g.method for g in gains)]))
    colors = {m: plt.get_cmap("tab10")(k % 10) for k, m in enumerate(methods)}
    cost = {(r["ipc"], r["method"]): r for r in rows}
    figure, axes = plt.subplots(
        max(1, len(ipcs)), 2, figsize=(12, 3.8 * max(1, len(ipcs))), squeeze=False
    )
    for (gain_axis, cost_axis), ipc in zip(axes, ipcs or [None], strict=True):
        paired = [g for g in gains if g.ipc == ipc]
        unpaired = [r["method"] for r in rows if r["ipc"] == ipc and r["method"] != baseline
                    and r["method"] not in {g.method for g in paired}]  # fmt: skip
        ticks = []  # the method, its synthesis seconds and image-iterations
        for k, gain in enumerate(paired):
            color = colors[gain.method]
            gain_axis.bar(k, gain.mean, 0.6, yerr=gain.std, capsize=4, color=color, alpha=0.75)
            seeds = list(gain.gains.values())
            offsets = np.linspace(-0.15, 0.15, len(seeds)) if len(seeds) > 1 else [0.0]
            gain_axis.scatter(k + np.asarray(offsets), seeds, s=14, color="black", zorder=3)
            row = cost.get((ipc, gain.method))
            if row is None:
                ticks.append(gain.method)
                continue
            seconds = row["synthesis_seconds"]
            ticks.append(
                f"{gain.method}\n{seconds:,.0f} s\n{_count(row['image_iterations'])} image-its"
            )
            cost_axis.errorbar(seconds, gain.mean, yerr=gain.std, fmt="o", capsize=4,
                               color=color, label=gain.method)  # fmt: skip
        gain_axis.set_xticks(range(len(paired)), ticks, fontsize=8)
        gain_axis.set_xlim(-0.6, max(len(paired), 3) - 0.4)  # one bar is not the axis' width
        gain_axis.axhline(0.0, color="gray", linewidth=0.8)
        gain_axis.set_ylabel(f"gain over {baseline}\n(points, paired by seed)")
        gain_axis.set_title(f"IPC {ipc}: gain, mean ± std over seeds (dots: seeds)", fontsize=10)
        gain_axis.grid(axis="y", alpha=0.3)
        cost_axis.axhline(0.0, color="gray", linewidth=0.8)
        positive = [
            cost[(ipc, g.method)]["synthesis_seconds"] for g in paired if (ipc, g.method) in cost
        ]
        if positive and all(v > 0 and math.isfinite(v) for v in positive):
            cost_axis.set_xscale("log")
        elif positive:
            cost_axis.set_xscale("symlog", linthresh=1.0)
        cost_axis.set_xlabel("synthesis seconds (mean over runs)")
        cost_axis.set_ylabel(f"gain over {baseline} (points)")
        cost_axis.set_title(f"IPC {ipc}: gain against synthesis cost", fontsize=10)
        cost_axis.grid(alpha=0.3)
        if cost_axis.get_legend_handles_labels()[0]:
            cost_axis.legend(fontsize=8, loc="best")
        note = []
        if not paired:
            note.append(f"no method paired with a {baseline} run by seed")
        if unpaired:
            note.append(f"not paired with {baseline} by seed: {', '.join(unpaired)}")
        if note:
            gain_axis.text(
                0.02, 0.02, "\n".join(note), transform=gain_axis.transAxes, fontsize=8, va="bottom"
            )
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)
