"""delt.recover: each method on a tiny synthetic set, EarlyLate masking, resume, bad configs."""

import json
import time

import delt.recover as recover_module
import pytest
import torch
from delt.config import ConfigError
from delt.data import DatasetInfo
from delt.models import TeacherMismatchError, build_model, load_checkpoint, save_checkpoint
from delt.recover import METHODS, RecoverConfig, RecoverySettings, optimize_chunk, recover
from delt.schedules import early_late_iterations
from delt.select import Selection

import delt_ext


def _config(tiny_teacher, tiny_selection, out, method="delt", **overrides):
    values = dict(
        teacher=str(tiny_teacher.path), ipc=5, out=str(out), method=method, iterations=8,
        batch_size=8, progress=False,
    )  # fmt: skip
    if method == "delt":
        values.update(selection=str(tiny_selection), round_iterations=2)
    values.update(overrides)
    return RecoverConfig(**values)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_writes_a_distilled_set(tiny_teacher, tiny_selection, tmp_path, method):
    result = recover(_config(tiny_teacher, tiny_selection, tmp_path, method))
    payload = torch.load(tmp_path / "distilled.pt", weights_only=True)
    images, labels = payload["images"], payload["labels"]
    assert images.shape == (20, 3, 8, 8) and images.dtype == torch.float32
    assert labels.tolist() == [c for c in range(4) for _ in range(5)]
    info = load_checkpoint(tiny_teacher.path).info
    low, high = info.pixel_bounds()
    assert bool(((images >= low - 1e-6) & (images <= high + 1e-6)).all())
    assert len(list((tmp_path / "images").glob("*/*.png"))) == 20
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000", "001", "002", "003"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["seed"] == 0
    assert set(manifest["versions"]) >= {"python", "torch", "delt_ext"}
    assert manifest["dataset"]["class_names"] == list(info.class_names)
    assert manifest["image_iterations"] == sum(manifest["iterations_per_image"])
    assert manifest["wall_seconds"] > 0
    if method == "delt":
        per_class = early_late_iterations(5, 8, 2)  # 4 rounds: [8, 8, 6, 4, 2]
        assert manifest["iterations_per_image"] == per_class * 4
        assert manifest["config"]["jitter"] == 0
    else:
        assert manifest["iterations_per_image"] == [8] * 20
        assert manifest["config"]["jitter"] == 4 and manifest["config"]["round_iterations"] is None
    assert result.iterations_per_image == manifest["iterations_per_image"]


def test_delt_starts_from_the_selection(tiny_teacher, tiny_selection, tmp_path, monkeypatch):
    seen = []
    original = recover_module.optimize_chunk

    def spy(teacher, bn_matching, init, *args, **kwargs):
        seen.append(init.clone())
        return original(teacher, bn_matching, init, *args, **kwargs)

    monkeypatch.setattr(recover_module, "optimize_chunk", spy)
    recover(_config(tiny_teacher, tiny_selection, tmp_path, batch_size=5))
    from delt.data import load_like

    dataset = load_like(load_checkpoint(tiny_teacher.path).info)
    chosen = Selection.load(tiny_selection).indices
    for c in range(4):  # batch 5 = IPC: chunk c is class c in selection order
        assert torch.equal(seen[c], dataset.images(chosen[c]))


def test_late_images_are_untouched_until_they_join():
    info = DatasetInfo("t", 2, 3, 8, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    torch.manual_seed(0)
    teacher = build_model("convnet1", info, {"width": 4}).eval().requires_grad_(False)
    teacher(torch.randn(1, 3, 8, 8))
    low, high = info.pixel_bounds()
    settings = RecoverySettings(0.25, (0.5, 0.9), 0.01, True, 0, False, "none", False, low, high)
    init = torch.rand(4, 3, 8, 8)
    with delt_ext.BNStatMatching(teacher) as bn_matching:
        # Rows 2 and 3 would join at iteration 6 of a 6-iteration loop: never forwarded.
        result = optimize_chunk(
            teacher, bn_matching, init, torch.tensor([0, 1, 0, 1]), [0, 0, 6, 6], 6, settings,
            torch.Generator().manual_seed(0),
        )  # fmt: skip
    assert torch.equal(result.images[2:], init[2:])
    assert not torch.equal(result.images[:2], init[:2])


@pytest.mark.parametrize("method", ["delt", "cda"])
def test_resume_after_a_kill_is_bitwise_identical(
    tiny_teacher, tiny_selection, tmp_path, monkeypatch, method
):
    reference = recover(_config(tiny_teacher, tiny_selection, tmp_path / "uninterrupted", method))

    calls = []
    original = recover_module.optimize_chunk

    def dies_after_one_chunk(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(recover_module, "optimize_chunk", dies_after_one_chunk)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        recover(_config(tiny_teacher, tiny_selection, out, method))
    assert [p.name for p in (out / "chunks").iterdir()] == ["00000.pt"]
    assert not (out / "distilled.pt").exists()

    rerun = []

    def counting(*args, **kwargs):
        rerun.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(recover_module, "optimize_chunk", counting)
    resumed = recover(_config(tiny_teacher, tiny_selection, out, method))
    assert len(rerun) == len(list((out / "chunks").iterdir())) - 1  # chunk 0 was skipped
    assert torch.equal(resumed.images, reference.images)
    # The very same bytes: distilled.pt, and every image file.
    assert (out / "distilled.pt").read_bytes() == (
        tmp_path / "uninterrupted" / "distilled.pt"
    ).read_bytes()
    first = torch.load(tmp_path / "uninterrupted" / "distilled.pt", weights_only=True)
    second = torch.load(out / "distilled.pt", weights_only=True)
    assert torch.equal(first["images"], second["images"]) and torch.equal(
        first["labels"], second["labels"]
    )
    for png in (tmp_path / "uninterrupted" / "images").glob("*/*.png"):
        assert png.read_bytes() == (out / png.relative_to(tmp_path / "uninterrupted")).read_bytes()


def test_manifest_wall_seconds_is_the_chunks_optimization_time_summed(
    tiny_teacher, tiny_selection, tmp_path
):
    # Documented in delt.recover: not the command's wall time, but each chunk's optimization
    # seconds as saved in OUT/chunks/, also for chunks an earlier (killed) process finished.
    config = _config(tiny_teacher, tiny_selection, tmp_path, "cda")
    first = recover(config)
    chunk_files = sorted((tmp_path / "chunks").iterdir())
    assert len(chunk_files) > 1
    saved = [torch.load(path, weights_only=True)["seconds"] for path in chunk_files]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["wall_seconds"] == first.wall_seconds == pytest.approx(sum(saved))
    # As if an earlier process had spent 1000 s on chunk 0: a re-run optimizes nothing, yet
    # reports that time.
    chunk = torch.load(chunk_files[0], weights_only=True)
    torch.save({**chunk, "seconds": 1000.0}, chunk_files[0])
    start = time.perf_counter()
    again = recover(config)
    assert time.perf_counter() - start < 1000
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["wall_seconds"] == again.wall_seconds == pytest.approx(1000 + sum(saved[1:]))


def test_resume_with_another_config_is_refused(tiny_teacher, tiny_selection, tmp_path):
    recover(_config(tiny_teacher, tiny_selection, tmp_path))
    with pytest.raises(ConfigError, match="--lr: 0.25 -> 0.1"):
        recover(_config(tiny_teacher, tiny_selection, tmp_path, lr=0.1))


def test_options_run(tiny_teacher, tiny_selection, tmp_path):
    recover(
        _config(
            tiny_teacher, tiny_selection, tmp_path, per_sample_aug=True, jitter=2, amp="bf16",
            channels_last=True, image_format="jpeg",
        )
    )  # fmt: skip
    assert len(list((tmp_path / "images").glob("*/*.jpg"))) == 20


def test_ipc1_delt_has_no_rounds(tiny_teacher, tiny_selection, tmp_path):
    result = recover(_config(tiny_teacher, tiny_selection, tmp_path, ipc=1))
    assert result.iterations_per_image == [8] * 4
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["round_iterations"] == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ipc": 0}, "--ipc must be an integer >= 1"),
        ({"method": "mtt"}, "--method 'mtt': unknown method"),
        ({"round_iterations": 16}, r"--round-iterations \(16\) must be <= --iterations \(8\)"),
        ({"round_iterations": 3}, "multiple"),
        ({"selection": None}, "pass --selection"),
        ({"lr": 0.0}, "--lr must be"),
        ({"beta2": 1.0}, "--beta2"),
        ({"jitter": -1}, "--jitter"),
    ],
)
def test_bad_configs(tiny_teacher, tiny_selection, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tiny_teacher, tiny_selection, tmp_path, **overrides)


def test_method_specific_flags_are_refused_elsewhere(tiny_teacher, tiny_selection, tmp_path):
    with pytest.raises(ConfigError, match="--round-iterations applies to --method delt"):
        _config(tiny_teacher, tiny_selection, tmp_path, "sre2l", round_iterations=2)
    with pytest.raises(ConfigError, match="--selection applies to --method delt"):
        _config(tiny_teacher, tiny_selection, tmp_path, "cda", selection=str(tiny_selection))


def test_selection_too_small(tiny_teacher, tiny_selection, tmp_path):
    with pytest.raises(ConfigError, match="only 5 images per class"):
        recover(_config(tiny_teacher, tiny_selection, tmp_path, ipc=6))


def test_teacher_dataset_mismatch(tiny_teacher, tiny_selection, tmp_path):
    other = DatasetInfo.from_dict(
        {**load_checkpoint(tiny_teacher.path).info.to_dict(), "class_names": ["w", "x", "y", "z"]}
    )
    path = tmp_path / "other.pt"
    meta = {"arch": "convnet2", "arch_kwargs": {"width": 8}, "dataset": other.to_dict()}
    save_checkpoint(path, build_model("convnet2", other, {"width": 8}), meta)
    config = _config(tiny_teacher, tiny_selection, tmp_path / "run", teacher=str(path))
    with pytest.raises(TeacherMismatchError, match="class order"):
        recover(config)


def test_missing_teacher(tiny_teacher, tiny_selection, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        recover(
            _config(tiny_teacher, tiny_selection, tmp_path, "sre2l", teacher=str(tmp_path / "x.pt"))
        )


@pytest.mark.slow
def test_compiled_teacher_gives_a_distilled_set(tiny_teacher, tiny_selection, tmp_path):
    result = recover(_config(tiny_teacher, tiny_selection, tmp_path, compile=True))
    assert result.images.shape == (20, 3, 8, 8) and torch.isfinite(result.images).all()


# --------------------------------------------------------------------------------------------
# PDD's union in the batch (optimize_chunk's frozen images)


class _Recorder(torch.nn.Module):
    """Runs the teacher and keeps every input batch and BNStatMatching's per-layer losses."""

    def __init__(self, teacher, bn_matching):
        super().__init__()
        self.teacher, self.bn_matching = teacher, bn_matching
        self.inputs, self.layer_losses = [], []

    def forward(self, x):
        logits = self.teacher(x)
        self.inputs.append(x.detach().clone())
        self.layer_losses.append(
            [loss.detach().clone() for loss in self.bn_matching.layer_losses()]
        )
        return logits


def _manual_layer_losses(teacher, x):
    """SRe2L's per-layer ||mean - running_mean||_2 + ||var - running_var||_2, by hand."""
    inputs = []
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    handles = [bn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for bn in bns]
    with torch.no_grad():
        teacher(x)
    for handle in handles:
        handle.remove()
    losses = []
    for bn, value in zip(bns, inputs, strict=True):
        mean = value.mean(dim=(0, 2, 3))
        var = value.var(dim=(0, 2, 3), unbiased=False)
        losses.append(torch.norm(mean - bn.running_mean) + torch.norm(var - bn.running_var))
    return losses


@pytest.mark.parametrize("frozen_sample", [None, 3])
def test_union_in_batch_matches_the_bn_statistics_of_the_union(frozen_sample):
    info = DatasetInfo("t", 2, 3, 8, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    torch.manual_seed(0)
    teacher = build_model("convnet2", info, {"width": 4})
    teacher.train()
    teacher(torch.randn(64, 3, 8, 8) * 2 + 1)  # running statistics that are not 0/1
    teacher.eval().requires_grad_(False)
    low, high = info.pixel_bounds()
    settings = RecoverySettings(0.25, (0.5, 0.9), 0.01, True, 0, False, "none", False, low, high)
    init = torch.rand(2, 3, 8, 8)
    frozen = torch.rand(6, 3, 8, 8) * 0.3 - 1.0  # other statistics than the new images'
    frozen_before = frozen.clone()
    with delt_ext.BNStatMatching(teacher) as bn_matching:
        recorder = _Recorder(teacher, bn_matching)
        result = optimize_chunk(
            recorder, bn_matching, init, torch.tensor([0, 1]), [0, 0], 4, settings,
            torch.Generator().manual_seed(0), frozen=frozen, frozen_sample=frozen_sample,
        )  # fmt: skip
    union_size = 2 + (frozen_sample or 6)
    assert [x.shape[0] for x in recorder.inputs] == [union_size] * 4
    # Iteration 0 crops the whole image (curriculum scale 1): the batch is the new images, then
    # the frozen ones, under one shared flip.
    first = recorder.inputs[0]
    flip = torch.equal(first[:2], init.flip(3))
    assert flip or torch.equal(first[:2], init)
    frozen_view = frozen.flip(3) if flip else frozen
    for row in first[2:]:
        assert any(torch.equal(row, candidate) for candidate in frozen_view)
    if frozen_sample is None:
        assert torch.equal(first[2:], frozen_view)
    # Every step's BN losses are those of the whole union batch, not of the new images alone.
    for x, recorded in zip(recorder.inputs, recorder.layer_losses, strict=True):
        manual = _manual_layer_losses(teacher, x)
        new_only = _manual_layer_losses(teacher, x[:2])
        for got, want, alone in zip(recorded, manual, new_only, strict=True):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(got, alone, rtol=1e-2)
    # Gradients reach the new images only: the frozen ones are bitwise unchanged.
    assert torch.equal(frozen, frozen_before)
    assert not torch.equal(result.images, init)


def test_pdd_fields_stay_out_of_other_methods_identity(tiny_teacher, tiny_selection, tmp_path):
    # Runs started before PDD existed have no such keys in run.json; they must still resume.
    identity = _config(tiny_teacher, tiny_selection, tmp_path).identity()
    assert not {"stages", "base", "union_in_batch", "stage_init"} & set(identity)
    with pytest.raises(ConfigError, match="--union-in-batch applies to --method pdd"):
        _config(tiny_teacher, tiny_selection, tmp_path, union_in_batch=True)
