"""delt.chunk_groups: K chunks per teacher step give the chunks of one at a time (up to float
rounding), resume at any K, and K = 1 stays the one-chunk loop."""

import dataclasses
import json

import delt.chunk_groups as chunk_groups_module
import delt.synthesis as synthesis_module
import pytest
import torch
from conftest import count_calls
from delt.config import ConfigError
from delt.recover import RecoverConfig, recover

import delt_ext

# Measured on this CPU: K = 3 against K = 1 differ by at most ~6e-6 in the images after 8 steps
# and ~2e-5 after 64 (another batch size sums the convolutions and statistics in another order;
# docs/chunks-per-step.md).
TOLERANCE = 1e-4


def _config(tiny_teacher, tiny_selection, out, method, **overrides):
    values = dict(
        teacher=str(tiny_teacher.path), ipc=5, out=str(out), method=method, iterations=8,
        batch_size=4, progress=False, keep_chunks=True,
    )  # fmt: skip
    if method == "delt":
        values.update(selection=str(tiny_selection), round_iterations=2, batch_size=5)
    values.update(overrides)
    return RecoverConfig(**values)


def _chunk_payloads(out):
    return {
        path.name: torch.load(path, weights_only=True)
        for path in sorted((out / "chunks").iterdir())
    }


@pytest.mark.parametrize("method", ["cda", "delt"])
def test_k_chunks_per_step_give_the_chunks_apart(
    tiny_teacher, tiny_selection, tmp_path, monkeypatch, method
):
    apart = recover(_config(tiny_teacher, tiny_selection, tmp_path / "k1", method))
    grouped = count_calls(monkeypatch, chunk_groups_module, "optimize_chunks")
    together = recover(
        _config(tiny_teacher, tiny_selection, tmp_path / "k3", method, chunks_per_step=3)
    )
    assert len(grouped) == 2  # 5 chunks (cda: 4 classes x IPC 5 / 4; delt: a class each): 3 + 2
    assert together.iterations_per_image == apart.iterations_per_image
    difference = (together.images - apart.images).abs().max().item()
    assert difference < TOLERANCE
    first, second = _chunk_payloads(tmp_path / "k1"), _chunk_payloads(tmp_path / "k3")
    assert first.keys() == second.keys()
    for name, payload in first.items():
        assert payload["loss"] == pytest.approx(second[name]["loss"], abs=TOLERANCE)
        assert torch.equal(payload["positions"], second[name]["positions"])
        assert torch.equal(payload["iterations"], second[name]["iterations"])
    manifest = json.loads((tmp_path / "k3" / "manifest.json").read_text())
    assert manifest["config"]["chunks_per_step"] == 3


def test_the_loss_of_k_chunks_is_the_sum_of_their_losses(tiny_teacher):
    # One step from the same start: the grouped loop's per-chunk losses and gradients are those
    # of optimize_chunk, each chunk apart.
    from delt.chunk_groups import ChunkSlotMatching, ChunkTask, optimize_chunks
    from delt.method import ClampPixels
    from delt.models import load_checkpoint
    from delt.synthesis import RecoverySettings, frozen_teacher, optimize_chunk

    model = frozen_teacher(load_checkpoint(tiny_teacher.path).model, torch.device("cpu"), False)
    low, high = torch.full((3, 1, 1), -5.0), torch.full((3, 1, 1), 5.0)
    settings = RecoverySettings(
        lr=0.1, betas=(0.5, 0.9), r_bn=0.01, crop_curriculum="cosine", jitter=2,
        per_sample_aug=False, amp="none", channels_last=False, post_step=ClampPixels(low, high),
    )  # fmt: skip
    inits = [torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n)) for n in (3, 4, 2)]
    labels = [torch.tensor(c) for c in ([0, 1, 2], [3, 0, 1, 2], [3, 3])]
    starts = [[0, 0, 2], [0, 0, 0, 0], [0, 2]]
    totals = [4, 4, 4]
    apart = []
    with delt_ext.BNStatMatching(model, first_bn_multiplier=10.0) as target:
        for k in range(3):
            result = optimize_chunk(
                model, target, inits[k], labels[k], starts[k], totals[k], settings,
                torch.Generator().manual_seed(k),
            )  # fmt: skip
            apart.append(result)
    target = ChunkSlotMatching(model, 10.0, 3)
    try:
        tasks = [
            ChunkTask(inits[k], labels[k], starts[k], totals[k], torch.Generator().manual_seed(k))
            for k in range(3)
        ]
        together = optimize_chunks(model, target, tasks, settings)
    finally:
        target.remove()
    for one, many in zip(apart, together, strict=True):
        assert (one.images - many.images).abs().max().item() < TOLERANCE
        assert one.loss == pytest.approx(many.loss, abs=TOLERANCE)


def test_k1_is_the_one_chunk_loop(tiny_teacher, tiny_selection, tmp_path, monkeypatch):
    calls = count_calls(monkeypatch, synthesis_module, "optimize_chunk")
    grouped = count_calls(monkeypatch, chunk_groups_module, "optimize_chunks")
    recover(_config(tiny_teacher, tiny_selection, tmp_path, "cda"))
    assert len(calls) == 5 and not grouped


@pytest.mark.parametrize(("first_k", "then_k"), [(1, 4), (4, 1)])
def test_a_run_resumes_at_another_k(
    tiny_teacher, tiny_selection, tmp_path, monkeypatch, first_k, then_k
):
    reference = recover(_config(tiny_teacher, tiny_selection, tmp_path / "whole", "cda"))
    out = tmp_path / "killed"
    # Killed after the first make: one chunk (K = 1) or one group of 4 (K = 4) saved.
    name = "optimize_chunk" if first_k == 1 else "optimize_chunks"
    module = synthesis_module if first_k == 1 else chunk_groups_module
    count_calls(monkeypatch, module, name, die_after=1)
    with pytest.raises(KeyboardInterrupt):
        recover(_config(tiny_teacher, tiny_selection, out, "cda", chunks_per_step=first_k))
    saved = sorted(p.name for p in (out / "chunks").iterdir())
    assert len(saved) == first_k
    monkeypatch.undo()
    before = {name: (out / "chunks" / name).read_bytes() for name in saved}
    resumed = recover(_config(tiny_teacher, tiny_selection, out, "cda", chunks_per_step=then_k))
    # The saved chunks were kept as they were, the others made at the new K.
    assert all((out / "chunks" / name).read_bytes() == data for name, data in before.items())
    assert len(list((out / "chunks").iterdir())) == 5
    assert (resumed.images - reference.images).abs().max().item() < TOLERANCE


def test_bad_chunks_per_step_is_refused(tiny_teacher, tiny_selection, tmp_path):
    with pytest.raises(ConfigError, match="--chunks-per-step"):
        recover(_config(tiny_teacher, tiny_selection, tmp_path, "cda", chunks_per_step=0))


def test_bench_synthesis_runs_k_chunks_side_by_side():
    from delt.bench import SynthesisBenchConfig, run_synthesis_bench

    config = SynthesisBenchConfig(
        method="cda", arch="convnet1", resolution=8, channels=1, classes=10, batch_size=2, ipc=1,
        iterations=4, rounds=1, repeats=1, device="cpu", threads=1, progress=False,
        chunks_per_step=3, rows=("delt", "+chunks-per-step"),
    )  # fmt: skip
    document = run_synthesis_bench(config)
    schedule = document["schedule"]
    assert schedule["chunks"] == 3 and schedule["iterations"] == 12
    assert schedule["image_iterations"] == 3 * 2 * 4
    assert [row["row"] for row in document["rows"]] == ["delt", "+chunks-per-step"]
    with pytest.raises(ConfigError, match="--chunks-per-step 6 > the 5 chunk"):
        run_synthesis_bench(dataclasses.replace(config, chunks_per_step=6))


def test_pdd_stages_with_their_union_give_the_chunks_apart(tiny_teacher, tmp_path):
    # The union of the earlier stages joins every chunk's forward, sampled from its generator.
    def pdd(out, **overrides):
        return recover(
            RecoverConfig(
                teacher=str(tiny_teacher.path),
                ipc=4,
                out=str(out),
                method="pdd",
                base="sre2l",
                stages=2,
                stage_ipc=[1, 3],
                union_in_batch=True,
                union_sample=2,
                iterations=4,
                batch_size=2,
                progress=False,
                **overrides,
            )
        )

    apart = pdd(tmp_path / "k1")
    together = pdd(tmp_path / "k3", chunks_per_step=3)
    assert (together.images - apart.images).abs().max().item() < TOLERANCE


# --------------------------------------------------------------------------------------------
# K chunks with per-class targets (--match class / class-mean)


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory, tiny_teacher):
    from delt.stats import StatsConfig, collect_statistics

    out = tmp_path_factory.mktemp("stats") / "stats.pt"
    collect_statistics(
        StatsConfig(teacher=str(tiny_teacher.path), out=str(out), batch_size=4, shard_size=8,
                    device="cpu", progress=False)
    )  # fmt: skip
    return out


CLASS_MATCHES = [("class", None), ("class", 0.5), ("class-mean", 0.5), ("class-mean", None)]


@pytest.mark.parametrize(("match", "weight"), CLASS_MATCHES)
def test_k_chunks_with_class_targets_are_their_losses_apart(
    tiny_teacher, stats_file, match, weight
):
    # One loop from the same starts: K chunks of several classes each, per-class targets, the
    # per-chunk images and losses of ClassMatching's loop, chunk by chunk.
    from delt.chunk_groups import ChunkClassMatching, ChunkTask, optimize_chunks
    from delt.matching import ClassMatching
    from delt.method import ClampPixels
    from delt.models import load_checkpoint
    from delt.stats import load_statistics
    from delt.synthesis import RecoverySettings, frozen_teacher, optimize_chunk

    model = frozen_teacher(load_checkpoint(tiny_teacher.path).model, torch.device("cpu"), False)
    statistics = load_statistics(stats_file)
    convention = {"class": "batch", "class-mean": "image"}[match]
    class_weight = 1.0 if weight is None else weight
    low, high = torch.full((3, 1, 1), -5.0), torch.full((3, 1, 1), 5.0)
    settings = RecoverySettings(
        lr=0.1, betas=(0.5, 0.9), r_bn=0.01, crop_curriculum="cosine", jitter=2,
        per_sample_aug=False, amp="none", channels_last=False, post_step=ClampPixels(low, high),
    )  # fmt: skip
    inits = [torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n)) for n in (3, 5, 2)]
    labels = [torch.tensor(c) for c in ([0, 1, 1], [3, 0, 1, 2, 3], [2, 2])]
    starts = [[0, 0, 2], [0, 0, 2, 0, 0], [0, 2]]  # EarlyLate: images joining later
    totals = [4, 6, 4]  # chunk 1 runs alone for its last two steps
    target = ClassMatching(model, 10.0, statistics, convention, match, class_weight)
    try:
        apart = [
            optimize_chunk(
                model,
                target,
                inits[k],
                labels[k],
                starts[k],
                totals[k],
                settings,
                torch.Generator().manual_seed(k),
            )  # fmt: skip
            for k in range(3)
        ]
    finally:
        target.remove()
    target = ChunkClassMatching(model, 10.0, 3, statistics, convention, match, class_weight)
    try:
        tasks = [
            ChunkTask(inits[k], labels[k], starts[k], totals[k], torch.Generator().manual_seed(k))
            for k in range(3)
        ]
        together = optimize_chunks(model, target, tasks, settings)
    finally:
        target.remove()
    for one, many in zip(apart, together, strict=True):
        # Measured: at most ~1e-6 in the images (float sums in another order).
        assert (one.images - many.images).abs().max().item() < TOLERANCE
        assert one.loss == pytest.approx(many.loss, abs=TOLERANCE)


@pytest.mark.parametrize(
    ("method", "match", "weight"), [("cda", "class", None), ("delt", "class-mean", 0.5)]
)
def test_k_chunks_with_class_matching_give_the_chunks_apart(
    tiny_teacher, tiny_selection, stats_file, tmp_path, monkeypatch, method, match, weight
):
    flags = dict(match=match, match_class_weight=weight, stats=str(stats_file))
    apart = recover(_config(tiny_teacher, tiny_selection, tmp_path / "k1", method, **flags))
    grouped = count_calls(monkeypatch, chunk_groups_module, "optimize_chunks")
    together = recover(
        _config(tiny_teacher, tiny_selection, tmp_path / "k3", method, chunks_per_step=3, **flags)
    )
    # --match class: class-contiguous chunks (cda: 20 images / 4 = 5 chunks; delt: 4 of 5)
    assert len(grouped) == 2
    assert together.iterations_per_image == apart.iterations_per_image
    assert (together.images - apart.images).abs().max().item() < TOLERANCE
    first, second = _chunk_payloads(tmp_path / "k1"), _chunk_payloads(tmp_path / "k3")
    assert first.keys() == second.keys()
    for name, payload in first.items():
        assert payload["loss"] == pytest.approx(second[name]["loss"], abs=TOLERANCE)
    # K is not part of the identity: the same run.json at K = 1 and K = 3.
    identity = (tmp_path / "k1" / "run.json").read_bytes()
    assert (tmp_path / "k3" / "run.json").read_bytes() == identity
    assert json.loads(identity)["config"]["match"] == match


def test_a_killed_class_run_at_k2_resumes_to_the_same_bytes(tmp_path, tiny_teacher, stats_file):
    import os
    import subprocess
    import sys

    def args(out, k):
        return [
            sys.executable, "-m", "delt", "recover", "--teacher", str(tiny_teacher.path),
            "--out", str(out), "--method", "sre2l", "--ipc", "4", "--iterations", "3",
            "--batch-size", "2", "--match", "class", "--match-class-weight", "0.5", "--stats",
            str(stats_file), "--chunks-per-step", str(k), "--no-progress",
        ]  # fmt: skip

    def env(**extra):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS="1", PYTHONSAFEPATH="1", **extra)
        return env

    def run(out, k, **extra):
        return subprocess.run(args(out, k), env=env(**extra), capture_output=True, text=True)

    whole = run(tmp_path / "whole", 2)
    assert whole.returncode == 0, whole.stderr[-2000:]
    # 8 chunks of 2 (a class's half each), 4 groups of 2: killed at the 6th write (run.json,
    # then the chunks: the third group's first chunk), after two groups were saved.
    killed = run(tmp_path / "killed", 2, DELT_FAULT_KILL_AT_WRITE="6")
    assert killed.returncode == -9
    saved = sorted(p.name for p in (tmp_path / "killed" / "chunks").glob("[0-9]*.pt"))
    assert saved == [f"{k:05d}.pt" for k in range(4)]
    resumed = run(tmp_path / "killed", 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(4 already done)" in resumed.stderr, resumed.stderr[-3000:]

    def files(folder):
        names = ["distilled.pt", *(str(p.relative_to(folder)) for p in folder.glob("images/*/*"))]
        return {name: (folder / name).read_bytes() for name in names}

    expected = files(tmp_path / "whole")
    assert len(expected) == 17 and files(tmp_path / "killed") == expected
    # Another K resumes the same run (K is not in the identity): a kill at K = 2, then K = 1.
    killed = run(tmp_path / "other", 2, DELT_FAULT_KILL_AT_WRITE="6")
    assert killed.returncode == -9
    resumed = run(tmp_path / "other", 1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(4 already done)" in resumed.stderr, resumed.stderr[-3000:]
    first = torch.load(tmp_path / "whole" / "distilled.pt", weights_only=True)
    second = torch.load(tmp_path / "other" / "distilled.pt", weights_only=True)
    assert (first["images"] - second["images"]).abs().max().item() < TOLERANCE
