"""``delt stats`` against the teacher's own forward pass over the same training set.

Rows, side by side in one run (group ``stats <data>``):

- ``forward``: the teacher (ConvNet-3, width 128, eval mode, inference mode) over every image of
  the training split in batches of 100: the floor of any statistics pass.
- ``delt-stats``: :func:`delt.stats.collect_statistics` over the same split into a fresh file:
  loading the teacher and the data, the dataset fingerprint, the float64 sums of every BN
  layer's input (per class, per class batch, per batch, per image), the shards written and
  merged, the file written.
- ``delt-stats-copy``: the same with the per-image sums of stats format version 1 (a float64
  copy of each BN input, then two torch reductions: ``delt_ext.reference.image_channel_sums``)
  in place of the fused ``delt_ext.image_channel_sums``: what the op saves.

Target (issue 30): ``delt-stats`` at >= 0.9x the throughput of ``forward`` (median times:
forward / delt-stats >= 0.9). Data: Fashion-MNIST's 60,000 training images when
``make fashion-mnist`` installed them, else a synthetic split of the same shape.

Run: pytest benchmarks/bench_stats.py --benchmark-only (``BENCH_STATS_ROUNDS``: rounds per row,
default 2)
"""

import os
import tempfile
from pathlib import Path

import delt.stats
import pytest
import torch
from delt.batches import iterate_batches
from delt.data import DatasetNotFoundError, load_dataset
from delt.models import build_model, save_checkpoint
from delt.stats import StatsConfig, collect_statistics

from delt_ext import reference

SYNTHETIC = "synthetic:classes=10,channels=1,size=28,train=6000,test=10"
BATCH = 100
ROUNDS = int(os.environ.get("BENCH_STATS_ROUNDS", "2"))
_setup: dict = {}


def _teacher() -> tuple[Path, object]:
    """An (untrained: the speed is the same) ConvNet-3 checkpoint of the data, and the data."""
    if not _setup:
        try:
            dataset = load_dataset("fashion-mnist", "train")
        except DatasetNotFoundError:
            dataset = load_dataset(SYNTHETIC, "train")
        folder = Path(tempfile.mkdtemp(prefix="bench-stats-"))
        torch.manual_seed(0)
        model = build_model("convnet3", dataset.info, {"width": 128}).eval()
        info = {**dataset.info.to_dict(), "fingerprint": dataset.fingerprint()}
        meta = {"arch": "convnet3", "arch_kwargs": {"width": 128}, "dataset": info}
        save_checkpoint(folder / "teacher.pt", model, meta)
        _setup.update(folder=folder, dataset=dataset, model=model)
    return _setup["folder"], _setup["dataset"]


@pytest.mark.parametrize("impl", ["forward", "delt-stats", "delt-stats-copy"])
def test_stats_pass(benchmark, impl, monkeypatch):
    folder, dataset = _teacher()
    model = _setup["model"]
    runs = iter(range(1000))

    def forward():
        with torch.inference_mode():
            for images, _ in iterate_batches(dataset, BATCH):
                model(images)

    def stats():
        out = folder / f"stats-{next(runs)}.pt"
        collect_statistics(
            StatsConfig(teacher=str(folder / "teacher.pt"), out=str(out), batch_size=BATCH,
                        device="cpu", progress=False)
        )  # fmt: skip
        out.unlink()

    benchmark.group = f"stats {dataset.info.name} {len(dataset)}"
    benchmark.extra_info["images"] = len(dataset)
    if impl == "delt-stats-copy":
        monkeypatch.setattr(delt.stats, "image_channel_sums", reference.image_channel_sums)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(forward if impl == "forward" else stats, rounds=ROUNDS, iterations=1)
