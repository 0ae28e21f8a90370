"""delt stats (the teacher's per-class BN statistics) and --match class / class-mean: exact
against a direct torch computation in every convention, resumable to the same bytes after a
kill, the same bytes on two torchrun ranks, refused with another teacher or data, checked at
load; the matching targets' losses against plain torch; recoveries that use them, resumed to
the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from delt.batches import iterate_batches
from delt.config import ConfigError
from delt.data import load_like
from delt.io import FileFormatError, torch_load, torch_save
from delt.models import TeacherMismatchError, load_checkpoint
from delt.stats import (
    STATS_VERSION,
    StatsConfig,
    _digest,
    collect_statistics,
    load_statistics,
    parts_folder,
)
from torch import nn

DELT = [sys.executable, "-m", "delt"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TIMEOUT = 240


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DELT_DIST_TIMEOUT="60")
    env["PYTHONSAFEPATH"] = "1"  # the checkout's delt_ext (no compiled library) must not shadow
    return {**env, **extra}


def _stats_args(teacher, out, batch_size=4, shard_size=8) -> list[str]:
    return [
        "stats", "--teacher", str(teacher), "--out", str(out), "--batch-size", str(batch_size),
        "--shard-size", str(shard_size), "--device", "cpu", "--no-progress",
    ]  # fmt: skip


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DELT, *args], env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT
    )


def _config(teacher, out, **flags) -> StatsConfig:
    values = {"batch_size": 4, "shard_size": 8, "device": "cpu", "progress": False, **flags}
    return StatsConfig(teacher=str(teacher), out=str(out), **values)


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory, tiny_teacher):
    """``delt stats`` of the tiny teacher, in one process (batches of 4, shards of 8)."""
    out = tmp_path_factory.mktemp("stats") / "stats.pt"
    collect_statistics(_config(tiny_teacher.path, out))
    return out


# --------------------------------------------------------------------------------------------
# Exactness


def _bn_inputs(teacher, batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every BN layer's input over the training split (float64), batched as delt stats does."""
    checkpoint = load_checkpoint(teacher)
    model = checkpoint.model.eval()
    dataset = load_like(checkpoint.info, "train")
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [
        m.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].double()))
        for i, m in enumerate(layers)
    ]
    labels = []
    with torch.inference_mode():
        for images, targets in iterate_batches(dataset, batch_size):
            model(images)
            labels.append(targets)
    for handle in handles:
        handle.remove()
    return [torch.cat(s) for s in seen], torch.cat(labels)


def _mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


def _batch_average(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_mean_var(part) for part in x.split(size)]
    return torch.stack([m for m, _ in pairs]).mean(0), torch.stack([v for _, v in pairs]).mean(0)


def test_statistics_are_exact_in_every_convention(tmp_path, tiny_teacher):
    size = 5  # 12 images per class: class batches of 5, 5, 2; the split's last batch of 3
    statistics = collect_statistics(
        _config(tiny_teacher.path, tmp_path / "s.pt", batch_size=5, shard_size=10)
    )
    inputs, labels = _bn_inputs(tiny_teacher.path, 5)
    assert len(inputs) == len(statistics.layer_names) == 2
    classes = statistics.num_classes
    assert statistics.class_images.tolist() == torch.bincount(labels, minlength=classes).tolist()

    def close(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)

    for name, x in zip(statistics.layer_names, inputs, strict=True):
        layer = statistics.layers[name]
        per_class = [x[labels == c] for c in range(classes)]
        # pixel: over all pixels of the class's images (and of the split)
        expected = [_mean_var(xc) for xc in per_class]
        close(layer["pixel"]["class_mean"], torch.stack([m for m, _ in expected]))
        close(layer["pixel"]["class_var"], torch.stack([v for _, v in expected]))
        close(layer["pixel"]["mean"], _mean_var(x)[0])
        close(layer["pixel"]["var"], _mean_var(x)[1])
        # image: the average of per-image statistics
        image_var = x.var((2, 3), unbiased=False)
        close(layer["image"]["class_mean"], torch.stack([xc.mean((0, 2, 3)) for xc in per_class]))
        close(layer["image"]["class_var"], torch.stack([image_var[labels == c].mean(0)
                                                          for c in range(classes)]))  # fmt: skip
        close(layer["image"]["var"], image_var.mean(0))
        # batch: the average of per-batch statistics, batches of 5 in dataset order
        expected = [_batch_average(xc, size) for xc in per_class]
        close(layer["batch"]["class_mean"], torch.stack([m for m, _ in expected]))
        close(layer["batch"]["class_var"], torch.stack([v for _, v in expected]))
        close(layer["batch"]["mean"], _batch_average(x, size)[0])
        close(layer["batch"]["var"], _batch_average(x, size)[1])
        assert layer["pixel"]["class_var"].dtype == torch.float64
    # Targets for any assignment of images to groups: group g gets class group_classes[g].
    targets = statistics.class_targets("pixel", torch.tensor([2, 0, 2]))
    assert torch.equal(targets[0][0][0], targets[0][0][2])
    assert torch.equal(targets[0][0][1], statistics.layers["features.1"]["pixel"]["class_mean"][0])
    assert not parts_folder(tmp_path / "s.pt").exists()  # the shards go once the file is written


# --------------------------------------------------------------------------------------------
# Shards: a killed run resumes to the same bytes; two torchrun ranks write the same bytes


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, tiny_teacher, stats_file):
    out = tmp_path / "stats.pt"
    killed = _run(_stats_args(tiny_teacher.path, out), DELT_FAULT_KILL_AT_WRITE="4")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()
    saved = sorted(p.name for p in parts_folder(out).glob("shard-*.pt"))
    assert saved == ["shard-00000.pt", "shard-00001.pt"]  # write 1: identity.json
    resumed = _run(_stats_args(tiny_teacher.path, out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "6 shards of 8 (6 of them this rank's, 4 to do)" in resumed.stderr
    assert out.read_bytes() == stats_file.read_bytes()
    again = _run(_stats_args(tiny_teacher.path, out))  # finished: nothing to do
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_two_torchrun_ranks_write_the_one_process_bytes(tmp_path, tiny_teacher, stats_file):
    out = tmp_path / "stats.pt"
    command = [*TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "delt"]
    result = subprocess.run(
        [*command, *_stats_args(tiny_teacher.path, out)], env=_env(), capture_output=True,
        text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert out.read_bytes() == stats_file.read_bytes()
    for rank in (0, 1):
        log = (tmp_path / "logs" / f"rank-{rank}.log").read_text()
        assert "(3 of them this rank's, 3 to do)" in log


# --------------------------------------------------------------------------------------------
# Refusals and checks at load


def _second_teacher(tmp_path: Path) -> Path:
    from conftest import SYNTHETIC
    from delt.teacher import TeacherConfig, train_teacher

    config = TeacherConfig(
        out=str(tmp_path / "other"), dataset=SYNTHETIC, arch="convnet2", width=8, epochs=1,
        batch_size=16, amp="none", channels_last=False, progress=False, seed=1,
    )  # fmt: skip
    return train_teacher(config).path


def test_another_teachers_statistics_are_refused(tmp_path, tiny_teacher, stats_file):
    other = _second_teacher(tmp_path)
    # delt stats: --out (finished) and its parts (unfinished) of another teacher
    with pytest.raises(ConfigError, match="another teacher"):
        collect_statistics(_config(other, stats_file))
    out = tmp_path / "unfinished.pt"
    collect_statistics(_config(tiny_teacher.path, out, keep_parts=True))
    out.unlink()  # an unfinished run of the tiny teacher in OUT.parts/
    with pytest.raises(ConfigError, match="unfinished run of another teacher"):
        collect_statistics(_config(other, out))
    # delt recover: refused before any work, naming the file
    run_out = tmp_path / "run"
    result = _run([
        "recover", "--teacher", str(other), "--out", str(run_out), "--method", "cda", "--ipc",
        "2", "--iterations", "2", "--match", "class", "--stats", str(stats_file),
        "--no-progress",
    ])  # fmt: skip
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"delt recover: error: --stats {stats_file}: statistics of another")
    assert not (run_out / "run.json").exists() and not (run_out / "chunks").exists()
    statistics = load_statistics(stats_file)
    with pytest.raises(TeacherMismatchError, match="another teacher"):
        statistics.check_teacher(load_checkpoint(other), "0" * 64, "--stats")


def test_a_damaged_or_foreign_file_is_refused_at_load(tmp_path, stats_file):
    payload = torch_load(stats_file)
    payload["layers"]["features.1"]["pixel"]["class_mean"][0, 0] += 1.0
    torch_save(payload, tmp_path / "damaged.pt")
    with pytest.raises(FileFormatError, match="damaged.pt: a damaged statistics file"):
        load_statistics(tmp_path / "damaged.pt")
    torch_save({"format": "something", "digest": ""}, tmp_path / "foreign.pt")
    with pytest.raises(FileFormatError, match="not a statistics file"):
        load_statistics(tmp_path / "foreign.pt")
    payload = torch_load(stats_file)
    payload["version"] = 99
    torch_save(payload, tmp_path / "future.pt")
    with pytest.raises(FileFormatError, match="version 99"):
        load_statistics(tmp_path / "future.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_statistics(tmp_path / "missing.pt")


def test_version_1_files_load_and_version_1_shards_are_computed_again(
    tmp_path, tiny_teacher, stats_file
):
    # A file of format version 1 (per-image sums of a float64 copy, torch's order) is read.
    payload = torch_load(stats_file)
    assert payload["version"] == STATS_VERSION == 2
    payload["version"] = 1
    payload["digest"] = _digest(payload)
    torch_save(payload, tmp_path / "v1.pt")
    assert load_statistics(tmp_path / "v1.pt").layer_names == payload["layer_names"]
    # An unfinished run's shard without this version (a version 1 shard, here with other sums)
    # is computed again, not merged: the file is the uninterrupted run's bytes.
    out = tmp_path / "stats.pt"
    collect_statistics(_config(tiny_teacher.path, out, keep_parts=True))
    out.unlink()
    path = parts_folder(out) / "shard-00001.pt"
    shard = torch_load(path)
    del shard["version"]
    shard["sums"][0]["class_sum"] += 1.0
    torch_save(shard, path)
    collect_statistics(_config(tiny_teacher.path, out))
    assert out.read_bytes() == stats_file.read_bytes()


def test_shard_size_must_be_whole_batches(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match="--shard-size 10 must be a multiple of --batch-size 4"):
        _config(tiny_teacher.path, tmp_path / "s.pt", shard_size=10)


def test_statistics_of_other_data_or_other_bn_layers_are_refused(tiny_teacher, stats_file):
    from delt.io import sha256_file
    from delt.models import data_fingerprint

    checkpoint, digest = load_checkpoint(tiny_teacher.path), sha256_file(tiny_teacher.path)
    statistics = load_statistics(stats_file)
    statistics.check_teacher(checkpoint, digest, "--stats")  # the teacher's own: accepted
    assert data_fingerprint(checkpoint.meta) is not None
    statistics.data = {**statistics.data, "fingerprint": "0" * 64}
    with pytest.raises(TeacherMismatchError, match="statistics of other data than the teacher's"):
        statistics.check_teacher(checkpoint, digest, "--stats")
    statistics = load_statistics(stats_file)
    statistics.layer_names = statistics.layer_names[1:]
    with pytest.raises(TeacherMismatchError, match="its BN layers .* are not the teacher's"):
        statistics.check_teacher(checkpoint, digest, "--stats")
