"""delt.bench: ``delt bench synthesis`` rows, JSON, projection and the eager reference."""

import json

import pytest
import torch
from delt.bench import (
    REPORTED_HOURS,
    ROWS,
    EagerBNHook,
    SynthesisBenchConfig,
    imagenet_image_iterations,
    reference_loop,
    run_synthesis_bench,
)
from delt.config import ConfigError
from delt.data import DatasetInfo
from delt.models import build_model

import delt_ext

TINY = dict(
    arch="convnet1", resolution=8, channels=1, classes=10, batch_size=6, ipc=3, iterations=4,
    rounds=2, repeats=1, device="cpu", threads=1, progress=False,
)  # fmt: skip


def test_imagenet_image_iterations_follow_the_schedules():
    # DELT (Shen et al., CVPR 2025): 115,500 (IPC 50) and 25,500 (IPC 10) image-iterations
    # per class-set of 1000.
    assert imagenet_image_iterations("delt", 50) == 115_500 * 1000
    assert imagenet_image_iterations("delt", 10) == 25_500 * 1000
    assert imagenet_image_iterations("cda", 50) == 50 * 4000 * 1000
    assert imagenet_image_iterations("delt", 1) == 4000 * 1000  # IPC 1: no EarlyLate


def test_bench_synthesis_writes_every_row(tmp_path, capsys):
    rows = tuple(row for row in ROWS if row != "+compile")
    path = tmp_path / "bench.json"
    document = run_synthesis_bench(SynthesisBenchConfig(rows=rows, json=str(path), **TINY))
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(document))
    assert [row["row"] for row in saved["rows"]] == list(rows)
    schedule = saved["schedule"]
    # ipc 3 in 2 rounds: groups of 2 and 1 per class, a chunk of 6 = 2 classes -> 4 then 6 active.
    assert schedule["active_counts"] == [4, 4, 6, 6]
    assert schedule["image_iterations"] == 20 and schedule["input_shape"] == [6, 1, 8, 8]
    by_name = {row["row"]: row for row in saved["rows"]}
    assert by_name["reference"]["vs_reference"] == 1.0 and by_name["floor"]["floor_over_row"] == 1.0
    for row in saved["rows"]:
        assert len(row["run_seconds"]) == 1 and row["median_seconds"] > 0
        assert row["ms_per_iteration"] == pytest.approx(1e3 * row["median_seconds"] / 4)
        rate = 20 / row["median_seconds"]
        assert row["image_iterations_per_second"] == pytest.approx(rate)
        assert row["vs_reference"] == pytest.approx(
            by_name["reference"]["median_seconds"] / row["median_seconds"]
        )
        assert row["imagenet_hours"]["ipc50"] == pytest.approx(115_500_000 / rate / 3600)
        assert row["peak_memory_mib"] is None  # CPU: not measured
    assert saved["reported_hours"]["ipc50"] == REPORTED_HOURS
    assert saved["machine"]["threads"] == 1 and saved["config"]["method"] == "delt"
    out = capsys.readouterr().out
    assert "| reference |" in out and "17.6 h" in out


@pytest.mark.parametrize("method", ["sre2l", "cda"])
def test_bench_synthesis_other_methods_use_the_whole_chunk(method):
    config = SynthesisBenchConfig(method=method, rows=("floor", "delt"), **TINY)
    document = run_synthesis_bench(config)
    assert document["schedule"]["active_counts"] == [6] * 4
    assert document["rows"][1]["imagenet_hours"]["ipc10"] == pytest.approx(
        10 * 4000 * 1000 / document["rows"][1]["image_iterations_per_second"] / 3600
    )


def test_eager_hook_is_the_bn_matching_formula():
    info = DatasetInfo("t", 3, 2, 8, (0.5,) * 2, (0.25,) * 2, ("a", "b", "c"))
    torch.manual_seed(0)
    model = build_model("convnet2", info, {"width": 4})
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 2, 8, 8) * 2 + 1)  # non-trivial running statistics
    model.eval()
    x = torch.randn(5, 2, 8, 8)
    hooks = [EagerBNHook(m) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model(x)
    eager = 10.0 * hooks[0].loss + sum(hook.loss for hook in hooks[1:])
    for hook in hooks:
        hook.handle.remove()
    with delt_ext.BNStatMatching(model, first_bn_multiplier=10.0) as matching:
        model(x)
        fused = matching.loss()
    torch.testing.assert_close(eager, fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rows=("reference", "nope")), "--rows reference,nope: expected one or more of"),
        (dict(rows=("floor", "floor")), "listed twice"),
        (dict(iterations=5), "--iterations (5) must be a multiple of --rounds (2)"),
        (dict(method="cda", batch_size=20), "--batch-size 20 > --classes 10"),
        (dict(repeats=0), "--repeats must be an integer >= 1"),
        (dict(threads=-1), "--threads must be an integer >= 0, got -1"),
    ],
)
def test_bad_bench_config_names_the_flag(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SynthesisBenchConfig(**{**TINY, **overrides})


def test_reference_loop_optimizes_only_active_images_within_bounds():
    # The eager reference does a recovery's work: late images are untouched until they join,
    # every image stays in the valid pixel range, and the loss decreases the images' CE.
    info = DatasetInfo("t", 2, 3, 8, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    torch.manual_seed(0)
    teacher = build_model("convnet1", info, {"width": 4}).eval().requires_grad_(False)
    low, high = (t.view(-1).tolist() for t in info.pixel_bounds())
    init = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 0, 1])
    starts = [0, 0, 3, 6]  # image 3 joins after the loop ends
    final = reference_loop(teacher, init, labels, starts, 6, True, 2, low, high, seed=0)
    assert torch.equal(final[3], init[3])
    assert not torch.equal(final[0], init[0]) and not torch.equal(final[2], init[2])
    for c in range(3):
        assert final[:, c].min() >= low[c] and final[:, c].max() <= high[c]
