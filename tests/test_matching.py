"""--match global|class|class-mean (delt.matching): the per-class targets' losses against plain
torch, recoveries with them (class-contiguous chunks, recorded in the manifest and the run
identity, resumed after a kill to the same bytes), and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from delt.config import ConfigError
from delt.matching import ClassMatching
from delt.models import load_checkpoint
from delt.recover import RecoverConfig, recover
from delt.stats import StatsConfig, collect_statistics, load_statistics
from torch import nn


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("stats") / "stats.pt"
    collect_statistics(
        StatsConfig(teacher=str(tiny_teacher.path), out=str(out), batch_size=4, shard_size=8,
                    device="cpu", progress=False)
    )  # fmt: skip
    return out


def _layer_loss(x, mean, var):
    """||mean(x) - mean||_2 + ||var(x) - var||_2 over (N, H, W), plain torch."""
    m, v = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    return torch.linalg.vector_norm(m - mean) + torch.linalg.vector_norm(v - var)


def _reference(model, statistics, images, labels, match, weight, convention):
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    inputs = []
    handles = [m.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for m in layers]
    model(images)
    for handle in handles:
        handle.remove()
    total = 0.0
    targets = statistics.class_targets(convention)
    for index, (x, layer, (mean, var)) in enumerate(zip(inputs, layers, targets, strict=True)):
        mean, var = mean.float(), var.float()
        if match == "class":
            present = labels.unique()
            term = sum(_layer_loss(x[labels == c], mean[c], var[c]) for c in present)
            term = term / len(present)
        else:
            term = _layer_loss(x, mean[labels].mean(0), var[labels].mean(0))
        running = _layer_loss(x, layer.running_mean, layer.running_var)
        term = (1 - weight) * running + weight * term
        total = total + (10.0 if index == 0 else 1.0) * term
    return total


@pytest.mark.parametrize(
    "match, weight, convention",
    [("class", 1.0, "batch"), ("class", 0.5, "pixel"), ("class-mean", 0.5, "image")],
)
def test_the_class_targets_loss_is_plain_torchs(
    tiny_teacher, stats_file, match, weight, convention
):
    model = load_checkpoint(tiny_teacher.path).model.eval()
    statistics = load_statistics(stats_file)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(7, 3, 8, 8, generator=generator, requires_grad=True)
    labels = torch.tensor([2, 0, 2, 2, 3, 0, 2])  # class 1 absent: it adds nothing
    target = ClassMatching(model, 10.0, statistics, convention, match, weight)
    target.set_labels(labels)
    model(images)
    loss = target.loss()
    (grad,) = torch.autograd.grad(loss, images)
    target.remove()
    expected = _reference(model, statistics, images, labels, match, weight, convention)
    (expected_grad,) = torch.autograd.grad(expected, images)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Recoveries


def _recover(tiny_teacher, out, **flags) -> RecoverConfig:
    values = {"ipc": 4, "iterations": 4, "batch_size": 8, "progress": False, "method": "cda",
              **flags}  # fmt: skip
    return RecoverConfig(teacher=str(tiny_teacher.path), out=str(out), **values)


def test_class_matching_runs_class_contiguous_and_is_recorded(tmp_path, tiny_teacher, stats_file):
    glob = recover(_recover(tiny_teacher, tmp_path / "global"))
    run = recover(_recover(tiny_teacher, tmp_path / "class", match="class", stats=str(stats_file)))
    assert not torch.equal(glob.images, run.images)
    identity = json.loads((tmp_path / "class" / "run.json").read_text())
    assert identity["config"]["match"] == "class"
    assert identity["config"]["stats_convention"] == "batch"  # WMDD's, by default
    assert identity["config"]["match_class_weight"] == 1.0
    assert len(identity["stats_sha256"]) == 64
    manifest = json.loads((tmp_path / "class" / "manifest.json").read_text())
    assert manifest["config"]["match"] == "class"
    # The default run's identity is what it was before --match existed.
    identity = json.loads((tmp_path / "global" / "run.json").read_text())
    assert not {"match", "match_class_weight", "stats_convention"} & set(identity["config"])
    assert "stats_sha256" not in identity
    # cda's chunks are class-interleaved; with --match class class-contiguous (2 of 2 classes).
    config = _recover(tiny_teacher, tmp_path / "x", match="class", stats=str(stats_file))
    chunks = config.recipe.chunks(4, 4, 8)
    assert [sorted(set(chunk.classes)) for chunk in chunks] == [[0, 1], [2, 3]]
    # A resume with another weight is refused, naming the flag.
    with pytest.raises(ConfigError, match="--match-class-weight: 1.0 -> 0.5"):
        recover(_recover(tiny_teacher, tmp_path / "class", match="class", stats=str(stats_file),
                         match_class_weight=0.5))  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONSAFEPATH="1", **extra)
    return env


@pytest.mark.parametrize("match", ["class", "class-mean"])
def test_a_killed_class_run_resumes_to_the_same_bytes(tmp_path, tiny_teacher, stats_file, match):
    def args(out):
        return [
            sys.executable, "-m", "delt", "recover", "--teacher", str(tiny_teacher.path),
            "--out", str(out), "--method", "sre2l", "--ipc", "4", "--iterations", "3",
            "--batch-size", "4", "--match", match, "--match-class-weight", "0.5", "--stats",
            str(stats_file), "--no-progress",
        ]  # fmt: skip

    whole = subprocess.run(args(tmp_path / "whole"), env=_env(), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = subprocess.run(
        args(tmp_path / "killed"), env=_env(DELT_FAULT_KILL_AT_WRITE="3"), capture_output=True,
        text=True,
    )  # fmt: skip
    assert killed.returncode == -9
    resumed = subprocess.run(args(tmp_path / "killed"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "already done" in resumed.stderr

    def files(folder):
        names = ["distilled.pt", *(str(p.relative_to(folder)) for p in folder.glob("images/*/*"))]
        return {name: (folder / name).read_bytes() for name in names}

    expected = files(tmp_path / "whole")
    assert len(expected) == 17 and files(tmp_path / "killed") == expected


# --------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"stats": "s.pt"}, "--stats applies to --match class or class-mean"),
        ({"match_class_weight": 0.5}, "--match-class-weight applies to --match class"),
        ({"match": "class"}, "--match class needs --stats FILE"),
        ({"match": "class", "stats": "s.pt", "match_class_weight": 0.0}, r"in \(0, 1\]"),
        (
            {"match": "class", "stats": "s.pt", "method": "rded", "ipc": 1, "iterations": 4000},
            "--match applies to the methods",
        ),
        (
            {
                "match": "class",
                "stats": "s.pt",
                "method": "pdd",
                "stages": 2,
                "union_in_batch": True,
            },
            "does not apply with --union-in-batch",
        ),
        (
            {
                "match": "class",
                "stats": "s.pt",
                "method": "pdd",
                "stages": 2,
                "stage_teachers": "checkpoints",
            },
            "does not apply with --stage-teachers checkpoints",
        ),
    ],
)
def test_matching_flags_are_checked(tmp_path, tiny_teacher, flags, message):
    with pytest.raises(ConfigError, match=message):
        _recover(tiny_teacher, tmp_path / "r", **flags)


def test_distill_refuses_match_for_the_baseline(tmp_path):
    from delt.pipeline import DistillConfig

    with pytest.raises(ConfigError, match="--match applies to the methods that optimize"):
        DistillConfig(method="random-real", ipc=1, out=str(tmp_path), match="class")


def test_pdd_stages_with_class_matching_run_and_are_recorded(tmp_path, tiny_teacher, stats_file):
    # --match on PDD's stages: every stage's chunks matched to the class statistics.
    flags = dict(method="pdd", base="cda", stages=2, stats=str(stats_file))
    glob = recover(_recover(tiny_teacher, tmp_path / "global", method="pdd", base="cda", stages=2))
    run = recover(_recover(tiny_teacher, tmp_path / "class", match="class", **flags))
    assert run.images.shape == glob.images.shape and torch.isfinite(run.images).all()
    assert not torch.equal(glob.images, run.images)
    identity = json.loads((tmp_path / "class" / "run.json").read_text())
    assert identity["config"]["match"] == "class" and len(identity["stats_sha256"]) == 64
