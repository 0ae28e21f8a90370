"""delt.methods.pdd: stage sizes and bookkeeping, frozen earlier stages, the three conditioning
options, resume between stages and chunks, bad configurations."""

import json

import delt.synthesis as synthesis_module
import pytest
import torch
from conftest import SYNTHETIC
from delt.cli import main
from delt.config import ConfigError
from delt.data import load_like
from delt.distilled_set import load_stage_unions, union_prefix
from delt.methods.pdd import pick_hard_examples
from delt.models import TeacherMismatchError, build_model, load_checkpoint, save_checkpoint
from delt.recover import RecoverConfig, recover
from delt.schedules import early_late_iterations
from delt.select import SelectConfig, Selection, select_images
from delt.teacher import TeacherConfig, saved_checkpoints, train_teacher

IPC = 4
CLASSES = 4


@pytest.fixture(scope="module")
def staged_teacher(tmp_path_factory):
    """A ConvNet-2 (width 8) trained 2 epochs with a checkpoint after each: the teacher path."""
    out = tmp_path_factory.mktemp("staged_teacher")
    config = TeacherConfig(
        out=str(out), dataset=SYNTHETIC, arch="convnet2", width=8, epochs=2, batch_size=16,
        amp="none", channels_last=False, progress=False, save_epochs=(1, 2),
    )  # fmt: skip
    return train_teacher(config).path


@pytest.fixture(scope="module")
def staged_selection(tmp_path_factory, staged_teacher):
    out = tmp_path_factory.mktemp("staged_selection")
    select_images(SelectConfig(teacher=str(staged_teacher), ipc=IPC, out=str(out), progress=False))
    return out


def _pdd(teacher, selection, out, base="delt", **overrides):
    values = dict(
        teacher=str(teacher), ipc=IPC, out=str(out), method="pdd", stages=2, base=base,
        iterations=8, batch_size=8, progress=False,
    )  # fmt: skip
    if base == "delt":
        values.update(selection=None if selection is None else str(selection), round_iterations=2)
    values.update(overrides)
    return RecoverConfig(**values)


class _Spy:
    """Wraps recover.optimize_chunk: records each call's arguments (cloned) and its result."""

    def __init__(self, monkeypatch, die_after=None):
        self.calls = []
        self.die_after = die_after
        self.original = synthesis_module.optimize_chunk
        monkeypatch.setattr(synthesis_module, "optimize_chunk", self)

    def __call__(self, teacher, bn_matching, init, labels, starts, total, *args, **kwargs):
        if self.die_after is not None and len(self.calls) == self.die_after:
            raise KeyboardInterrupt("simulated kill")
        frozen = kwargs.get("frozen")
        frozen_before = None if frozen is None else frozen.clone()
        result = self.original(teacher, bn_matching, init, labels, starts, total, *args, **kwargs)
        self.calls.append(
            {
                "teacher": teacher,
                "init": init.clone(),
                "labels": labels.tolist(),
                "starts": list(starts),
                "total": total,
                "frozen": frozen_before,
                "frozen_after": None if frozen is None else frozen.clone(),
                "frozen_sample": kwargs.get("frozen_sample"),
                "result": result.images.clone(),
            }
        )
        return result


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_stage_sizes_and_bookkeeping(staged_teacher, staged_selection, tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    out = tmp_path / "run"
    # --keep-chunks: the stages' own sets stay (by default they go with the chunks).
    config = _pdd(staged_teacher, staged_selection, out, stage_ipc=(3, 1), keep_chunks=True)
    result = recover(config)
    manifest = _manifest(out)
    assert manifest["method"] == "pdd" and manifest["ipc"] == IPC
    assert manifest["config"]["stage_ipc"] == [3, 1] and manifest["config"]["base"] == "delt"
    # Class-major, stage order inside a class: 3 images of stage 1 then 1 of stage 2.
    assert manifest["stage_per_image"] == [1, 1, 1, 2] * CLASSES
    # Stage 1 runs DELT's rounds over its 3 images; stage 2 (1 per class) has no rounds.
    per_class = early_late_iterations(3, 8, 2) + [8]
    assert per_class == [8, 6, 4, 8]
    assert manifest["iterations_per_image"] == per_class * CLASSES
    assert result.iterations_per_image == manifest["iterations_per_image"]
    assert manifest["image_iterations"] == sum(per_class) * CLASSES
    entries = manifest["stages"]
    assert [(e["stage"], e["ipc"], e["offset"], e["union_ipc"]) for e in entries] == [
        (1, 3, 0, 3),
        (2, 1, 3, 4),
    ]
    assert [e["image_iterations"] for e in entries] == [18 * CLASSES, 8 * CLASSES]
    assert [e["init"]["kind"] for e in entries] == ["selection", "selection"]
    # The selection is consumed in order across stages, never reused.
    dataset = load_like(load_checkpoint(staged_teacher).info)
    chosen = Selection.load(staged_selection).indices
    stage_two = spy.calls[-1]  # stage 2: one chunk of 4 classes x 1 image
    assert stage_two["starts"] == [0] * CLASSES and stage_two["total"] == 8
    assert torch.equal(stage_two["init"], dataset.images([chosen[c][3] for c in range(CLASSES)]))
    # Outputs: U_P, and per stage its new images and the union so far.
    payload = torch.load(out / "distilled.pt", weights_only=True)
    assert payload["images"].shape == (CLASSES * IPC, 3, 8, 8)
    assert torch.equal(payload["images"], result.images)
    assert payload["labels"].tolist() == [c for c in range(CLASSES) for _ in range(IPC)]
    assert len(list((out / "images").glob("*/*.png"))) == CLASSES * IPC
    assert sorted(p.name for p in (out / "stages" / "2" / "images" / "000").iterdir()) == [
        "003.png"
    ]
    assert len(list((out / "stages" / "1" / "images").glob("*/*.png"))) == 3 * CLASSES
    unions = load_stage_unions(out)
    assert [tuple(images.shape) for images, _ in unions] == [(12, 3, 8, 8), (16, 3, 8, 8)]
    for k, (images, labels) in enumerate(unions, start=1):
        stage_set = torch.load(out / "stages" / str(k) / "distilled.pt", weights_only=True)
        assert torch.equal(stage_set["images"], images) and torch.equal(stage_set["labels"], labels)
        stage_manifest = _manifest(out / "stages" / str(k))
        assert stage_manifest["ipc"] == [3, 4][k - 1] and stage_manifest["stage"] == k
        assert stage_manifest["num_images"] == len(images)
    assert torch.equal(unions[-1][0], payload["images"])


def test_earlier_stages_stay_bitwise_unchanged(tmp_path, monkeypatch, staged_teacher):
    # Three stages over CDA (noise init, one image per class per chunk), union in the batch.
    spy = _Spy(monkeypatch)
    out = tmp_path / "run"
    config = _pdd(
        staged_teacher, None, out, base="cda", stages=3, ipc=3, union_in_batch=True,
        keep_chunks=True,  # it reads the stages' own sets
    )  # fmt: skip
    recover(config)
    final = torch.load(out / "distilled.pt", weights_only=True)["images"]
    manifest = _manifest(out)
    for k in (1, 2):
        # stages/<k>/distilled.pt was written when stage k ended; the later stages changed none
        # of its images.
        snapshot = torch.load(out / "stages" / str(k) / "distilled.pt", weights_only=True)
        assert torch.equal(union_prefix(final, 3, k), snapshot["images"])
    assert manifest["stage_per_image"] == [1, 2, 3] * CLASSES
    # One chunk per stage (batch 8 >= 4 classes); stages 2 and 3 saw the earlier images, frozen.
    assert [call["frozen"] is None for call in spy.calls] == [True, False, False]
    stage_one = spy.calls[0]["result"]
    assert torch.equal(spy.calls[1]["frozen"], stage_one)
    assert torch.equal(spy.calls[2]["frozen"], union_prefix(final, 3, 2))
    for call in spy.calls[1:]:
        assert torch.equal(call["frozen"], call["frozen_after"])
    assert torch.equal(final[0::3], stage_one)


def test_union_sample_and_chunk_classes(tmp_path, monkeypatch, staged_teacher, staged_selection):
    # Batch 4 = one class per chunk under DELT's class-contiguous batching (2 per stage ->
    # chunks of 2 classes): each chunk gets the earlier images of its own classes only.
    spy = _Spy(monkeypatch)
    out = tmp_path / "run"
    recover(
        _pdd(
            staged_teacher, staged_selection, out, batch_size=4, union_in_batch=True, union_sample=3
        )
    )
    final = torch.load(out / "distilled.pt", weights_only=True)["images"]
    stage_two = [call for call in spy.calls if call["frozen"] is not None]
    assert len(stage_two) == 2 and all(call["frozen_sample"] == 3 for call in stage_two)
    union_one = union_prefix(final, IPC, 2)
    for call, classes in zip(stage_two, [(0, 1), (2, 3)], strict=True):
        assert call["labels"] == [classes[0]] * 2 + [classes[1]] * 2
        rows = [2 * c + j for c in classes for j in range(2)]
        assert torch.equal(call["frozen"], union_one[rows])


def test_stage_teachers_are_the_checkpoints_early_first(
    tmp_path, monkeypatch, staged_teacher, staged_selection
):
    spy = _Spy(monkeypatch)
    out = tmp_path / "run"
    recover(_pdd(staged_teacher, staged_selection, out, stage_teachers="checkpoints"))
    entries = _manifest(out)["stages"]
    assert [entry["teacher"]["epoch"] for entry in entries] == [1, 2]
    checkpoints = saved_checkpoints(staged_teacher)
    for call, entry in zip(spy.calls, checkpoints, strict=True):
        expected = load_checkpoint(entry["path"]).model.state_dict()
        got = call["teacher"].state_dict()
        assert all(torch.equal(got[k].cpu(), expected[k]) for k in expected)
    first, second = (load_checkpoint(e["path"]).model.state_dict() for e in checkpoints)
    assert not torch.equal(first["features.1.running_mean"], second["features.1.running_mean"])
    run = json.loads((out / "run.json").read_text())
    assert len(run["stage_teachers_sha256"]) == 2


def test_missing_or_mismatched_checkpoints(
    tmp_path, staged_teacher, staged_selection, tiny_teacher
):
    with pytest.raises(ConfigError, match="needs 2 teacher checkpoints, but .* has 0"):
        recover(
            _pdd(tiny_teacher.path, None, tmp_path / "a", base="cda", stage_teachers="checkpoints")
        )
    with pytest.raises(
        ConfigError, match=r"needs 3 teacher checkpoints, .* has 2 \(epochs \[1, 2\]\)"
    ):
        recover(
            _pdd(staged_teacher, staged_selection, tmp_path / "b", stages=3,
                 stage_teachers="checkpoints")
        )  # fmt: skip
    # A copy of the teacher whose second checkpoint is gone, or of another width.
    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    for name in ("teacher.pt", "teacher.json"):
        (copy / name).write_bytes((staged_teacher.parent / name).read_bytes())
    first = saved_checkpoints(staged_teacher)[0]["path"]
    for suffix in (".pt", ".json"):
        target = copy / "checkpoints" / first.with_suffix(suffix).name
        target.write_bytes(first.with_suffix(suffix).read_bytes())
    with pytest.raises(ConfigError, match="epoch-002.pt .*is missing"):
        recover(
            _pdd(
                copy / "teacher.pt", None, tmp_path / "c", base="cda", stage_teachers="checkpoints"
            )
        )
    teacher = load_checkpoint(staged_teacher)
    meta = {**teacher.meta, "arch_kwargs": {"width": 4}, "epoch": 2}
    save_checkpoint(
        copy / "checkpoints" / "epoch-002.pt",
        build_model("convnet2", teacher.info, {"width": 4}),
        meta,
    )
    with pytest.raises(TeacherMismatchError, match="epoch-002.pt is a convnet2"):
        recover(
            _pdd(
                copy / "teacher.pt", None, tmp_path / "d", base="cda", stage_teachers="checkpoints"
            )
        )


def test_pick_hard_examples_tiers_and_order():
    labels = torch.tensor([0] * 6 + [1] * 4)
    teacher_probability = torch.tensor([0.9, 0.5, 0.7, 0.2, 0.6, 0.3, 0.8, 0.4, 0.6, 0.9])
    teacher_correct = teacher_probability > 0.45
    student_correct = torch.tensor(
        [True, False, False, False, True, False, True, False, True, True]
    )
    student_probability = torch.tensor([0.9, 0.1, 0.2, 0.1, 0.6, 0.2, 0.7, 0.3, 0.5, 0.9])
    picks, tiers = pick_hard_examples(
        labels, teacher_probability, teacher_correct, student_probability, student_correct,
        counts=3, used={2},
    )  # fmt: skip
    # Class 0: student-wrong & teacher-right is {1} (2 is used); then both wrong {3, 5} in
    # medium order of the teacher's probability (0.2, 0.3 -> mid = 1: 5 then 3).
    assert picks[0] == [1, 5, 3]
    # Class 1: student-wrong & teacher-right: none (7 has 0.4); both wrong: {7}; then the
    # student's least confident right answers: 8 (0.5), 6 (0.7).
    assert picks[1] == [7, 8, 6]
    assert tiers == {"student_wrong_teacher_right": 1, "both_wrong": 3, "student_right": 2}
    with pytest.raises(ConfigError, match="class 1 has only 4 unused"):
        pick_hard_examples(
            labels, teacher_probability, teacher_correct, student_probability, student_correct,
            counts=5, used=set(),
        )  # fmt: skip


def test_hard_init_starts_later_stages_from_unused_real_images(
    tmp_path, monkeypatch, staged_teacher, staged_selection
):
    spy = _Spy(monkeypatch)
    out = tmp_path / "run"
    recover(_pdd(staged_teacher, staged_selection, out, stage_init="hard", hard_student_epochs=2))
    saved = json.loads((out / "stages" / "2" / "init.json").read_text())
    picks = saved["picks"]
    chosen = Selection.load(staged_selection).indices
    dataset = load_like(load_checkpoint(staged_teacher).info)
    assert [len(p) for p in picks] == [2] * CLASSES
    for c in range(CLASSES):
        assert not set(picks[c]) & set(chosen[c][:2])  # stage 1's images are not reused
        assert all(int(dataset.targets[i]) == c for i in picks[c])
    stage_two = spy.calls[-1]
    expected = dataset.images([picks[c][j] for c in range(CLASSES) for j in range(2)])
    assert torch.equal(stage_two["init"], expected)
    entries = _manifest(out)["stages"]
    assert entries[0]["init"]["kind"] == "selection" and entries[1]["init"]["kind"] == "hard"
    assert sum(entries[1]["init"]["tiers"].values()) == 2 * CLASSES


def test_resume_between_stages_and_chunks_is_bitwise_identical(
    tmp_path, monkeypatch, staged_teacher, staged_selection
):
    # Two stages of two chunks each, every option on. The run is killed after each chunk in turn:
    # inside stage 1, at the stage boundary (before stage 2's hard init), inside stage 2.
    def config(out):
        return _pdd(
            staged_teacher, staged_selection, out, batch_size=4, union_in_batch=True,
            union_sample=3, stage_init="hard", hard_student_epochs=2,
            stage_teachers="checkpoints",
        )  # fmt: skip

    reference = tmp_path / "uninterrupted"
    recover(config(reference))
    out = tmp_path / "killed"
    spy = _Spy(monkeypatch)
    for finished in (1, 2, 3):
        spy.die_after = len(spy.calls) + 1  # one more chunk, then a kill
        with pytest.raises(KeyboardInterrupt):
            recover(config(out))
        assert len(spy.calls) == finished
        assert len(list((out / "stages").glob("*/chunks/*.pt"))) == finished
        assert not (out / "distilled.pt").exists()
        assert (out / "stages" / "2" / "init.json").exists() == (finished >= 2)
    spy.die_after = None
    recover(config(out))
    assert len(spy.calls) == 4  # every chunk ran exactly once over all the invocations
    # A finished run keeps U_P (every U_k is a prefix of it), not the stages' chunks and sets.
    for folder in (out, reference):
        kept = sorted(p.name for p in (folder / "stages" / "2").iterdir())
        assert kept == ["images", "init.json"]
    files = ["distilled.pt", *(str(p.relative_to(reference)) for p in reference.glob("**/*.png"))]
    for name in files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    picks = [json.loads((f / "stages/2/init.json").read_text())["picks"] for f in (out, reference)]
    assert picks[0] == picks[1]


def test_resume_with_other_stages_is_refused(tmp_path, staged_teacher, staged_selection):
    recover(_pdd(staged_teacher, staged_selection, tmp_path))
    with pytest.raises(ConfigError, match=r"--stage-ipc: \[2, 2\] -> \[3, 1\]"):
        recover(_pdd(staged_teacher, staged_selection, tmp_path, stage_ipc=(3, 1)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stages": 5}, "--stages 5 must be <= --ipc 4"),
        ({"stages": 0}, "--stages must be an integer >= 1"),
        ({"stage_ipc": (2, 1)}, "--stage-ipc 2,1 must sum to --ipc 4, got 3"),
        ({"stage_ipc": (1, 1, 2)}, "one size per stage expected"),
        ({"stage_ipc": (4, 0)}, "every stage needs >= 1 image"),
        ({"union_sample": 3}, "--union-sample applies with --union-in-batch"),
        ({"union_in_batch": True, "union_sample": 0}, "--union-sample must be an integer >= 1"),
        ({"hard_student_epochs": 3}, "--hard-student-epochs applies with --stage-init hard"),
        ({"base": "mtt"}, "--base 'mtt': unknown method"),
        ({"selection": None}, "--method pdd --base delt starts from real images"),
    ],
)
def test_bad_configs(tmp_path, overrides, message):
    selection = overrides.pop("selection", "sel")
    with pytest.raises(ConfigError, match=message):
        _pdd("t.pt", selection, tmp_path, **overrides)


def test_bad_base_specific_flags(tmp_path):
    with pytest.raises(ConfigError, match="--round-iterations applies to --method delt"):
        _pdd("t.pt", None, tmp_path, base="cda", round_iterations=2)
    with pytest.raises(ConfigError, match="--stages applies to --method pdd"):
        RecoverConfig(teacher="t.pt", ipc=4, out=str(tmp_path), method="cda", stages=2)


def test_pdd_through_the_cli(tmp_path, staged_teacher, capsys):
    argv = (
        f"recover --method pdd --base sre2l --stages 2 --stage-ipc 1,3 --teacher {staged_teacher}"
    )
    argv += f" --ipc 4 --out {tmp_path} --iterations 2 --union-in-batch --no-progress"
    assert main(argv.split()) == 0
    assert "image-iterations" in capsys.readouterr().out
    assert _manifest(tmp_path)["stage_per_image"] == [1, 2, 2, 2] * CLASSES
    assert main([*argv.split(), "--stages", "5"]) == 2
    assert "--stages 5 must be <= --ipc 4" in capsys.readouterr().err
