"""Methods are data: a method registered from this file (real images shifted by one pixel) runs
through ``delt recover``, ``delt distill`` and a killed-and-resumed recovery without an edit to
any module of ``delt``; the registry's lookups and refusals."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import SYNTHETIC
from delt.chunks import ChunkResult
from delt.cli import main
from delt.config import ConfigError
from delt.data import DatasetInfo, load_like
from delt.method import Method, RecoverResult, SynthesisConfig, method_named, methods, register
from delt.pipeline import DistillConfig, distill
from delt.recover import RecoverConfig, recover
from delt.runtime import derive_seed
from delt.schedules import class_contiguous_chunks
from delt.synthesis import delete_resume_state, finished_without_chunks, prepare_run

SHIFT = 1  # pixels, along the width


class ShiftedReal(Method):
    """A toy method: per class, ``ipc`` seeded real training images rolled by ``SHIFT``."""

    name = "toy-shift"
    optimizes = False
    made: list[int] = []  # chunk indices made by this process (the test spies on it)

    def reads_training_set(self, config: object) -> bool:
        return True

    def recover(self, config: SynthesisConfig) -> RecoverResult:
        run = prepare_run(config)
        config, info = run.config, run.info
        dataset = load_like(info, "train", config.data_root)
        run.check_identity(False)
        finished = run.finished_result() or finished_without_chunks(run.out)
        if finished is not None:
            return finished
        store = run.chunk_store(run.out / "chunks", config.ipc)

        def make(chunk, generator):
            members = torch.nonzero(dataset.targets == chunk.classes[0]).view(-1)
            picked = members[torch.randperm(members.numel(), generator=generator)[: len(chunk)]]
            ShiftedReal.made.append(chunk.index)
            images = dataset.images(picked).roll(SHIFT, dims=-1)
            return ChunkResult(images, 0.0, 0.0), [0] * len(chunk)

        chunks = class_contiguous_chunks(info.num_classes, config.ipc, config.ipc)
        images, iterations, seconds = store.make_all(
            chunks, lambda chunk: derive_seed(config.seed, chunk.index), make, False, "toy"
        )
        labels = torch.arange(info.num_classes).repeat_interleave(config.ipc)
        run.write_outputs(run.out, None, images, labels, config.ipc, iterations, seconds)
        delete_resume_state(run.out, [store.folder], config.keep_chunks)
        return RecoverResult(run.out, images, labels, iterations, seconds)


TOY = register(ShiftedReal())


def _config(teacher, out, **overrides):
    values = dict(teacher=str(teacher.path), ipc=2, out=str(out), method="toy-shift")
    return RecoverConfig(**{**values, "progress": False, **overrides})


def test_a_method_registered_from_a_test_runs_through_delt_recover(tiny_teacher, tmp_path):
    assert method_named("toy-shift", recovers=True) is TOY
    ShiftedReal.made = []
    result = recover(_config(tiny_teacher, tmp_path / "api"))
    assert result.images.shape == (8, 3, 8, 8) and ShiftedReal.made == [0, 1, 2, 3]
    manifest = json.loads((tmp_path / "api" / "manifest.json").read_text())
    assert manifest["method"] == "toy-shift" and "stages" not in manifest["config"]
    # Every image is a real one rolled by SHIFT: rolled back, it is a training image of its class.
    dataset = load_like(DatasetInfo.from_dict(manifest["dataset"]), "train")
    for image, label in zip(result.images, result.labels, strict=True):
        members = dataset.images(torch.nonzero(dataset.targets == label).view(-1))
        assert (members == image.roll(-SHIFT, dims=-1)).flatten(1).all(1).any()
    # The command line takes it too (its choices are read from the registry when it is built).
    out = tmp_path / "cli"
    argv = ["recover", "--teacher", str(tiny_teacher.path), "--ipc", "2", "--out", str(out)]
    assert main([*argv, "--method", "toy-shift", "--no-progress"]) == 0
    assert torch.equal(torch.load(out / "distilled.pt")["images"], result.images)
    # The methods' own flags are refused on it with their messages, as on any other method.
    with pytest.raises(ConfigError, match="--stages applies to --method pdd, not toy-shift"):
        _config(tiny_teacher, tmp_path / "x", stages=2)
    with pytest.raises(ConfigError, match="--factor applies to --method rded, not toy-shift"):
        _config(tiny_teacher, tmp_path / "x", factor=1)


def test_a_killed_toy_recovery_resumes_to_the_same_bytes(tiny_teacher, tmp_path, monkeypatch):
    whole = recover(_config(tiny_teacher, tmp_path / "whole"))
    monkeypatch.setattr(ShiftedReal, "made", _Spy(after=2))
    with pytest.raises(KeyboardInterrupt):
        recover(_config(tiny_teacher, tmp_path / "killed"))
    assert sorted(p.name for p in (tmp_path / "killed" / "chunks").iterdir()) == ["00000.pt"]
    monkeypatch.setattr(ShiftedReal, "made", _Spy(after=None))
    resumed = recover(_config(tiny_teacher, tmp_path / "killed"))
    assert list(ShiftedReal.made) == [1, 2, 3]  # chunk 0 was loaded, not made again
    assert torch.equal(resumed.images, whole.images)
    # Another identity is refused by run.json, naming the flag.
    with pytest.raises(ConfigError, match="--seed: 0 -> 1"):
        recover(_config(tiny_teacher, tmp_path / "killed", seed=1))


class _Spy(list):
    """A list of made chunks that raises KeyboardInterrupt (a kill) at the ``after``-th."""

    def __init__(self, after: int | None) -> None:
        super().__init__()
        self.after = after

    def append(self, index: int) -> None:
        if self.after is not None and len(self) + 1 == self.after:
            raise KeyboardInterrupt("killed")
        super().append(index)


def test_a_method_registered_from_a_test_runs_through_delt_distill(tiny_teacher, tmp_path):
    config = DistillConfig(
        method="toy-shift", ipc=2, out=str(tmp_path), dataset=SYNTHETIC,
        teacher=str(tiny_teacher.path), eval_epochs=1, eval_every=1, progress=False,
    )  # fmt: skip
    result = distill(config)
    assert result.report["method"] == "toy-shift" and result.report["image_iterations"] == 0
    assert not (tmp_path / "select").exists()  # it starts from no selection
    again = distill(config)
    assert all(step["cached"] for step in again.steps)


def test_the_registry_holds_the_built_in_methods_in_order():
    assert list(methods())[:6] == ["sre2l", "cda", "delt", "pdd", "rded", "random-real"]
    with pytest.raises(ConfigError, match="--method 'mtt': unknown method; known: sre2l, cda"):
        method_named("mtt")
    with pytest.raises(ConfigError, match="unknown method"):
        method_named("random-real", recovers=True)  # a baseline of distill, not a recovery


def test_pdd_and_rded_are_presets_over_the_components():
    from delt.matching import matching_target
    from delt.method import ClampPixels, clamp_to_pixel_range

    def recipe(method, **options):
        return method_named(method).recipe(SimpleNamespace(method=method, **options))

    # pdd: its base's components, with progressive stages as the schedule.
    for base in ("sre2l", "cda", "delt"):
        base_recipe, pdd = recipe(base), recipe("pdd", base=base)
        assert pdd.stages and not base_recipe.stages
        assert pdd == dataclasses.replace(base_recipe, stages=True)
        assert base_recipe.target is matching_target
    # rded: scored real crops, one class per chunk, no matching target (nothing optimized).
    rded = recipe("rded")
    assert rded.init == "scored_crops" and rded.target is None
    chunks = rded.chunks(3, 2, 100)
    assert [chunk.classes for chunk in chunks] == [(0, 0), (1, 1), (2, 2)]
    # The step's post-processing: the clamp to each channel's valid range, in place.
    info = DatasetInfo("t", 2, 3, 8, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    clamp = clamp_to_pixel_range(info)
    assert isinstance(clamp, ClampPixels) and recipe("delt").post_step is clamp_to_pixel_range
    pixels = torch.tensor([-10.0, 0.0, 10.0]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    clamp(pixels)
    assert pixels[0, :, 0, 0].tolist() == [-2.0, 0.0, 2.0]  # (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
