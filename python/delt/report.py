"""Reports: image grids, a run's ``report.json`` (exactly :data:`REPORT_KEYS`) and ``report.md``,
and ``delt report``: a bar chart and table comparing methods over runs (runs of one method,
dataset and IPC are pooled).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from delt.config import ConfigError, option
from delt.data import DatasetInfo
from delt.distilled_set import Manifest
from delt.io import atomic_open, check_output, read_json, write_if_changed, write_json

__all__ = [
    "REPORT_KEYS",
    "ReportConfig",
    "compare_runs",
    "load_report",
    "pool_reports",
    "set_report",
    "write_image_grid",
    "write_run_report",
]

# The keys of report.json with their types, in this order, and nothing else (details go to
# report.md).
_KEY_TYPES = {
    "method": str,
    "dataset": str,
    "ipc": int,
    "accuracy_mean": float,
    "accuracy_std": float,
    "diversity": float,
    "synthesis_seconds": float,
    "image_iterations": int,
}
REPORT_KEYS = tuple(_KEY_TYPES)
METHOD_ORDER = ("random-real", "rded", "sre2l", "cda", "delt")


def write_image_grid(
    images: Tensor, labels: Tensor, info: DatasetInfo, path: str | Path, upscale: int = 3
) -> None:
    """Writes a PNG grid: one row per class (in label order), its images left to right.

    Args:
        images: (N, C, H, W) float, normalized as ``info`` says.
        labels: (N,) int64.
        info: the dataset (for denormalization).
        path: the PNG file (written atomically).
        upscale: nearest-neighbour magnification (28-pixel images are too small to look at).
    """
    from torchvision.utils import make_grid, save_image

    pixels = info.denormalize(images.float()).clamp(0, 1)
    if upscale > 1:
        pixels = torch.nn.functional.interpolate(pixels, scale_factor=upscale, mode="nearest")
    per_class = [pixels[labels == c] for c in range(info.num_classes)]
    columns = max(1, max(len(row) for row in per_class))
    blank = torch.ones_like(pixels[:1])
    tiles = [torch.cat([row, blank.expand(columns - len(row), -1, -1, -1)]) for row in per_class]
    grid = make_grid(torch.cat(tiles), nrow=columns, padding=2, pad_value=1.0)
    encoded = io.BytesIO()
    save_image(grid, encoded, format="png")
    write_if_changed(path, encoded.getvalue())  # the same grid: the file is left as it is


def check_report(report: dict, where: str = "report") -> None:
    """Raises ValueError unless ``report`` has exactly the eight keys with the right types."""
    if tuple(report) != REPORT_KEYS:
        raise ValueError(f"{where}: keys must be {list(REPORT_KEYS)}, got {list(report)}")
    for key, kind in _KEY_TYPES.items():
        value = report[key]
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and not math.isfinite(value):
                raise ValueError(
                    f"{where}: {key} is {value!r}, not a finite number: not a result to report "
                    "(the set or its evaluation is broken; re-run the command that made it)"
                )
        if not ok:
            raise ValueError(f"{where}: {key} must be {kind.__name__}, got {value!r}")


def write_run_report(out: str | Path, report: dict, markdown: str) -> None:
    """Writes ``OUT/report.json`` (checked against :data:`REPORT_KEYS`) and ``OUT/report.md``."""
    check_report(report)
    out = Path(out)
    write_json(out / "report.json", report)
    write_if_changed(out / "report.md", markdown.encode())


def set_report(folder: str | Path) -> dict:
    """The report of a distilled-set folder that ``delt eval`` and ``delt diversity`` have
    scored (``manifest.json``, ``eval.json``, ``diversity.json``): e.g. an imported set.

    Raises:
        FileNotFoundError: one of the three files is missing (the message says which command
            writes it).
        ValueError: the evaluation is not complete.
    """
    folder = Path(folder)
    needed = {
        "manifest.json": "`delt recover` or `delt import`",
        "eval.json": "`delt eval`",
        "diversity.json": "`delt diversity`",
    }
    for name, writer in needed.items():
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"--runs {folder}: no report.json, and no {name} for a set's report (run "
                f"{writer} --distilled {folder}; or pass output folders of `delt distill`)"
            )
    manifest = Manifest.load(folder)
    evaluation = read_json(folder / "eval.json")
    diversity = read_json(folder / "diversity.json")
    if not evaluation.get("complete"):
        raise ValueError(f"--runs {folder}: eval.json is not complete (rerun `delt eval`)")
    return {
        "method": manifest.method,
        "dataset": manifest.dataset.name,
        "ipc": manifest.ipc,
        "accuracy_mean": float(evaluation["best"]["mean"]),
        "accuracy_std": float(evaluation["best"]["std"]),
        "diversity": float(diversity["mean"]),
        "synthesis_seconds": float(manifest.synthesis_seconds),
        "image_iterations": manifest.image_iterations,
    }


def load_report(run: str | Path) -> dict:
    """The report.json of a run folder (or the file itself), checked; a distilled-set folder
    without one is reported from its manifest, eval.json and diversity.json (:func:`set_report`)."""
    path = Path(run)
    if path.is_dir():
        if not (path / "report.json").is_file() and (path / "manifest.json").is_file():
            report = set_report(path)
            check_report(report, str(path))
            return report
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"--runs {run}: no report.json (pass output folders of `delt distill`, or scored "
            "distilled-set folders)"
        )
    report = read_json(path)
    check_report(report, str(path))
    return report


def pool_reports(reports: list[dict]) -> list[dict]:
    """Pools runs of the same (dataset, ipc, method); see the module docstring.

    Returns:
        One dict per group, sorted by dataset, IPC and method (paper order), with the eight keys
        plus ``runs`` (how many were pooled).
    """
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for report in reports:
        groups.setdefault((report["dataset"], report["ipc"], report["method"]), []).append(report)

    def method_rank(method: str) -> tuple[int, str]:
        return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)

    pooled = []
    for (dataset, ipc, method), members in sorted(
        groups.items(), key=lambda item: (item[0][0], item[0][1], method_rank(item[0][2]))
    ):
        accuracies = [m["accuracy_mean"] for m in members]
        std = float(np.std(accuracies)) if len(members) > 1 else members[0]["accuracy_std"]
        pooled.append(
            {
                "method": method,
                "dataset": dataset,
                "ipc": ipc,
                "accuracy_mean": float(np.mean(accuracies)),
                "accuracy_std": std,
                "diversity": float(np.mean([m["diversity"] for m in members])),
                "synthesis_seconds": float(np.mean([m["synthesis_seconds"] for m in members])),
                "image_iterations": int(round(np.mean([m["image_iterations"] for m in members]))),
                "runs": len(members),
            }
        )
    return pooled


def markdown_table(rows: list[dict]) -> str:
    """The pooled rows as a Markdown table."""
    lines = [
        "| dataset | IPC | method | runs | accuracy (%) | diversity (cos, lower = more diverse) "
        "| synthesis s | image-iterations |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dataset']} | {row['ipc']} | {row['method']} | {row['runs']} "
            f"| {row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f} | {row['diversity']:.4f} "
            f"| {row['synthesis_seconds']:.1f} | {row['image_iterations']:,} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Grouped bars: accuracy (± std) and diversity per method, one group per (dataset, IPC)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["dataset"], r["ipc"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_key = {(r["dataset"], r["ipc"], r["method"]): r for r in rows}
    width = 0.8 / max(1, len(methods))
    positions = np.arange(len(groups))
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(groups) + 4), 4.2))
    panels = (
        ("accuracy_mean", "accuracy_std", "student top-1 (%)"),
        ("diversity", None, "cosine to class centroid\n(lower = more diverse)"),
    )
    for axis, (key, error_key, label) in zip(axes, panels, strict=True):
        for k, method in enumerate(methods):
            values = [by_key.get((d, i, method), {}).get(key, math.nan) for d, i in groups]
            errors = (
                [by_key.get((d, i, method), {}).get(error_key, 0.0) for d, i in groups]
                if error_key
                else None
            )
            axis.bar(
                positions + (k - (len(methods) - 1) / 2) * width, values, width, yerr=errors,
                capsize=3, label=method,
            )  # fmt: skip
        axis.set_xticks(positions, [f"{d}\nIPC {i}" for d, i in groups])
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
        if key == "diversity":
            finite = [r["diversity"] for r in rows if math.isfinite(r["diversity"])]
            if finite:
                low = min(finite)
                axis.set_ylim(max(0.0, low - 0.1 * (1.0 - low) - 0.02), 1.0)
    handles, labels = axes[0].get_legend_handles_labels()
    # Below the panels, so that no bar is hidden behind it.
    figure.legend(handles, labels, loc="lower center", ncol=len(methods), frameon=False)
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)


@dataclass
class ReportConfig:
    """Configuration of ``delt report`` (one field per flag)."""

    runs: tuple[str, ...] = option(
        help="output folders of `delt distill` (or report.json files, or distilled-set folders "
        "scored by `delt eval` and `delt diversity`)"
    )
    out: str = option("comparison.png", help="bar chart PNG; the table also goes to OUT.md")
    title: str = option("", help="chart title")

    def __post_init__(self) -> None:
        self.runs = tuple(self.runs)
        if not self.runs:
            raise ConfigError("--runs needs at least one run folder")
        if not self.out.lower().endswith(".png"):
            raise ConfigError(f"--out must name a .png file, got {self.out!r}")


def compare_runs(config: ReportConfig) -> list[dict]:
    """Runs ``delt report``: reads the runs, writes the chart and ``OUT.md``, returns the rows."""
    check_output(config.out, "--out", folder=False)
    rows = pool_reports([load_report(run) for run in config.runs])
    plot_comparison(rows, config.out, config.title)
    table = markdown_table(rows)
    with atomic_open(Path(config.out).with_suffix(".md"), "w") as handle:
        handle.write(table)
    print(table, end="")
    print(f"chart: {config.out}")
    return rows
