"""delt.pipeline: the cached pipeline and its report files."""

import json

import pytest
import torch
from conftest import SYNTHETIC
from delt.config import ConfigError
from delt.evaluate import StudentTrainer
from delt.models import TeacherMismatchError
from delt.pipeline import DistillConfig, distill
from delt.recover import RecoverConfig, recover
from delt.report import REPORT_KEYS
from delt.select import SelectConfig, select_images

TYPES = {
    "method": str, "dataset": str, "ipc": int, "accuracy_mean": float, "accuracy_std": float,
    "diversity": float, "synthesis_seconds": float, "image_iterations": int,
}  # fmt: skip

# The recover step's identity of `_config()` as distill recorded it before pdd joined distill
# (RecoverConfig's identity fields without rded's; pdd's at their defaults): runs of that time
# must stay cached, so it may not change.
EARLIER_DELT_IDENTITY = {
    "ipc": 2, "method": "delt", "iterations": 4, "round_iterations": 2, "batch_size": 4,
    "lr": 0.25, "beta1": 0.5, "beta2": 0.9, "r_bn": 0.01, "first_bn_multiplier": 10.0,
    "jitter": None, "per_sample_aug": False, "amp": "none", "channels_last": False,
    "compile": False, "image_format": "png", "seed": 0, "stages": None, "base": None,
    "stage_ipc": None, "stage_teachers": "final", "union_in_batch": False, "union_sample": None,
    "stage_init": "base", "hard_student_epochs": None,
}  # fmt: skip
# What distill records of it now: the fields off their defaults (delt.identity).
_NOT_DEFAULTS = ("ipc", "iterations", "round_iterations", "batch_size")


def _config(out, teacher_path, **overrides):
    values = dict(
        method="delt", ipc=2, out=str(out), dataset=SYNTHETIC, teacher=str(teacher_path),
        iterations=4, round_iterations=2, recover_batch_size=4, eval_epochs=2, eval_every=1,
        progress=False,
    )  # fmt: skip
    values.update(overrides)
    return DistillConfig(**values)


def _forbid(monkeypatch, *targets):
    def fail(*args, **kwargs):
        raise AssertionError("a cached step ran again")

    for target in targets:
        monkeypatch.setattr(target, fail)


def test_distill_writes_the_report_and_a_rerun_does_no_work(tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "delt"
    result = distill(_config(out, tiny_teacher.path))
    report = json.loads((out / "report.json").read_text())
    assert tuple(report) == REPORT_KEYS and report == result.report
    for key, kind in TYPES.items():
        assert type(report[key]) is kind, key
    assert report["method"] == "delt" and report["ipc"] == 2
    assert report["image_iterations"] == 4 * (4 + 2)  # EarlyLate: 4 + 2 iterations per class
    assert 0 <= report["accuracy_mean"] <= 100 and -1 <= report["diversity"] <= 1
    markdown = (out / "report.md").read_text()
    assert "| 0 |" in markdown and "grid.png" in markdown and "diversity" in markdown
    threads = torch.get_num_threads()
    assert f"| torch CPU threads (recovery, evaluation) | {threads}, {threads} |" in markdown
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("eval.json", "diversity.json", "manifest.json"):
        assert (out / "distilled" / name).is_file()
    step = json.loads((out / "steps" / "recover.json").read_text())
    assert step["identity"]["recover"] == {
        key: value for key, value in EARLIER_DELT_IDENTITY.items() if key in _NOT_DEFAULTS
    }
    # A record of that time (every field written out) is the same identity: still cached.
    step["identity"]["recover"] = EARLIER_DELT_IDENTITY
    (out / "steps" / "recover.json").write_text(json.dumps(step))

    _forbid(
        monkeypatch, "delt.pipeline.recover", "delt.select.score_images",
        "delt.diversity.penultimate_features",
    )  # fmt: skip
    monkeypatch.setattr(StudentTrainer, "train_epoch", lambda *a: pytest.fail("trained again"))
    again = distill(_config(out, tiny_teacher.path))
    assert again.report == report
    assert all(step["cached"] for step in again.steps)


def test_a_changed_eval_flag_reruns_only_the_evaluation(tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "cda"
    first = distill(_config(out, tiny_teacher.path, method="cda", round_iterations=None))
    _forbid(monkeypatch, "delt.pipeline.recover")
    second = distill(
        _config(out, tiny_teacher.path, method="cda", round_iterations=None, eval_epochs=3)
    )
    steps = {step["step"]: step["cached"] for step in second.steps}
    assert steps["recover"] and not steps["eval"] and steps["diversity"]
    assert second.report["image_iterations"] == first.report["image_iterations"]
    assert len(second.evaluation.seeds[0].train_loss) == 3


def test_a_changed_recovery_is_refused_clearly(tiny_teacher, tmp_path):
    out = tmp_path / "sre2l"
    distill(_config(out, tiny_teacher.path, method="sre2l", round_iterations=None))
    with pytest.raises(ConfigError, match="--iterations: 4 -> 3.*delete .*distilled"):
        distill(
            _config(out, tiny_teacher.path, method="sre2l", round_iterations=None, iterations=3)
        )


def test_recover_lr_reaches_the_recovery(tiny_teacher, tmp_path):
    # The papers' 0.25 unless --recover-lr says otherwise (the quality benchmark's delt-lr0.05).
    for out, overrides, expected in ((tmp_path / "a", {}, 0.25),
                                     (tmp_path / "b", {"recover_lr": 0.05}, 0.05)):  # fmt: skip
        distill(_config(out, tiny_teacher.path, method="cda", round_iterations=None, **overrides))
        manifest = json.loads((out / "distilled" / "manifest.json").read_text())
        assert manifest["config"]["lr"] == expected
    a = torch.load(tmp_path / "a" / "distilled" / "distilled.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "distilled" / "distilled.pt", weights_only=True)
    assert not torch.equal(a["images"], b["images"])


def test_random_real_baseline(tiny_teacher, tmp_path):
    result = distill(_config(tmp_path / "rr", tiny_teacher.path, method="random-real",
                             round_iterations=None, seed=3))  # fmt: skip
    assert result.report["image_iterations"] == 0 and result.report["method"] == "random-real"
    manifest = json.loads((tmp_path / "rr" / "distilled" / "manifest.json").read_text())
    assert len(manifest["indices"]) == 8 and manifest["seed"] == 3


def test_rded_through_distill(tiny_teacher, tmp_path):
    result = distill(_config(tmp_path / "rded", tiny_teacher.path, method="rded", iterations=4000,
                             round_iterations=None, candidates=10, num_crop=2))  # fmt: skip
    assert result.report["method"] == "rded" and result.report["image_iterations"] == 0
    assert result.report["synthesis_seconds"] > 0
    manifest = json.loads((tmp_path / "rded" / "distilled" / "manifest.json").read_text())
    assert manifest["config"]["candidates"] == 10 and manifest["config"]["num_crop"] == 2
    assert not (tmp_path / "rded" / "select").exists()  # rded draws its own candidates


def test_rded_data_is_checked_before_the_teacher_is_trained(tmp_path, monkeypatch):
    import delt.pipeline as distill_module

    monkeypatch.setattr(distill_module, "train_teacher", lambda *a: pytest.fail("work started"))
    config = DistillConfig(method="rded", ipc=1, out=str(tmp_path), dataset=SYNTHETIC, factor=3,
                           candidates=9, progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="--factor 3 must divide the image resolution 8"):
        distill(config)


def _stages_of(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest, [(entry["stage"], entry["ipc"]) for entry in manifest["stages"]]


def test_pdd_through_distill_is_delt_recover_pdd(tiny_teacher, tmp_path, monkeypatch):
    # pdd over delt: distill selects, then recovers 2 stages of 2 images per class (DELT's
    # rounds inside each stage: 4 + 2 iterations per class and stage).
    pdd = dict(method="pdd", ipc=4, stages=2)
    out = tmp_path / "pdd"
    result = distill(_config(out, tiny_teacher.path, **pdd))
    assert result.report["method"] == "pdd"
    assert result.report["image_iterations"] == 4 * 2 * (4 + 2)
    assert [step["step"] for step in result.steps][:3] == ["teacher", "select", "recover"]
    manifest, stages = _stages_of(out / "distilled")
    assert stages == [(1, 2), (2, 2)] and manifest["config"]["base"] == "delt"
    assert manifest["config"]["stage_teachers"] == "final"
    assert "2 stages of 2,2 images per class" in (out / "report.md").read_text()

    # The same set from `delt select` + `delt recover --method pdd` with the same flags.
    select_images(SelectConfig(teacher=str(tiny_teacher.path), ipc=4, out=str(tmp_path / "sel"),
                               batch_size=2000, progress=False))  # fmt: skip
    recover(
        RecoverConfig(
            teacher=str(tiny_teacher.path), ipc=4, out=str(tmp_path / "recover"), method="pdd",
            stages=2, selection=str(tmp_path / "sel"), iterations=4, round_iterations=2,
            batch_size=4, progress=False,
        )
    )  # fmt: skip
    by_distill = torch.load(out / "distilled" / "distilled.pt", weights_only=True)
    by_recover = torch.load(tmp_path / "recover" / "distilled.pt", weights_only=True)
    assert torch.equal(by_distill["images"], by_recover["images"])
    assert torch.equal(by_distill["labels"], by_recover["labels"])
    recovered = _stages_of(tmp_path / "recover")[0]
    for key in ("iterations_per_image", "stage_per_image"):
        assert recovered[key] == manifest[key]

    def timeless(entries):
        return [{k: v for k, v in entry.items() if not k.endswith("seconds")} for entry in entries]

    assert timeless(recovered["stages"]) == timeless(manifest["stages"])

    # Re-running is fully cached.
    _forbid(
        monkeypatch, "delt.pipeline.recover", "delt.select.score_images",
        "delt.diversity.penultimate_features",
    )  # fmt: skip
    monkeypatch.setattr(StudentTrainer, "train_epoch", lambda *a: pytest.fail("trained again"))
    again = distill(_config(out, tiny_teacher.path, **pdd))
    assert all(step["cached"] for step in again.steps) and again.report == result.report


def test_pdd_stage_teachers_of_the_teacher_trained_here(tmp_path):
    # --teacher-save-epochs gives the teacher distill trains its per-stage checkpoints.
    config = _config(
        tmp_path, "", method="pdd", base="cda", round_iterations=None, stages=2,
        stage_teachers="checkpoints", teacher=None, arch="convnet1", width=4, teacher_epochs=2,
        teacher_save_epochs=(1, 2),
    )  # fmt: skip
    result = distill(config)
    manifest, stages = _stages_of(tmp_path / "distilled")
    assert stages == [(1, 1), (2, 1)] and result.report["method"] == "pdd"
    assert [entry["teacher"]["epoch"] for entry in manifest["stages"]] == [1, 2]
    assert not (tmp_path / "select").exists()  # a cda base starts from noise


def test_pdd_stage_teachers_without_checkpoints_are_refused_before_any_work(
    tiny_teacher, tmp_path, monkeypatch
):
    _forbid(monkeypatch, "delt.pipeline.select_images", "delt.pipeline.recover")
    config = _config(
        tmp_path, tiny_teacher.path, method="pdd", stages=2, stage_teachers="checkpoints"
    )
    with pytest.raises(ConfigError, match="--stages 2 needs 2 teacher checkpoints, but .* has 0"):
        distill(config)


def test_teacher_of_another_dataset_is_refused(tiny_teacher, tmp_path):
    with pytest.raises(TeacherMismatchError, match="was trained on synthetic"):
        distill(_config(tmp_path, tiny_teacher.path, dataset="fashion-mnist"))


@pytest.mark.parametrize(
    "overrides, message",
    [({"method": "mtt"}, "--method 'mtt': unknown"),
     ({"method": "cda"}, "--round-iterations applies to --method delt"),
     ({"arch": "nonet"}, "unknown architecture"),
     ({"eval_epochs": 0}, "--eval-epochs must be"),
     ({"iterations": 3}, "multiple of --round-iterations"),
     ({"method": "rded", "round_iterations": None}, "--iterations applies to the methods that"),
     ({"recover_lr": 0.0}, "--recover-lr must be a finite number > 0, got 0.0"),
     ({"method": "random-real", "round_iterations": None, "recover_lr": 0.05},
      "--recover-lr applies to the methods that optimize pixels, not random-real"),
     ({"method": "random-real", "round_iterations": None, "factor": 1},
      "--factor applies to --method rded, not random-real"),
     ({"method": "rded", "round_iterations": None, "iterations": 4000, "candidates": 3},
      r"--candidates 3 must be >= --ipc x --factor\^2 = 8"),
     # pdd's flags on the other methods, by name
     ({"stages": 2}, "--stages applies to --method pdd, not delt"),
     ({"method": "cda", "round_iterations": None, "stage_teachers": "checkpoints"},
      "--stage-teachers applies to --method pdd, not cda"),
     ({"method": "rded", "round_iterations": None, "iterations": 4000, "union_in_batch": True},
      "--union-in-batch applies to --method pdd, not rded"),
     ({"method": "random-real", "round_iterations": None, "stage_init": "hard"},
      "--stage-init applies to --method pdd, not random-real"),
     ({"method": "pdd", "stages": 2, "factor": 1}, "--factor applies to --method rded, not pdd"),
     # and pdd's own checks
     ({"method": "pdd"}, "--stages 5 must be <= --ipc 2"),
     ({"method": "pdd", "stages": 2, "base": "cda"},
      "--round-iterations applies to --method delt and to pdd --base delt; pdd --base cda has"),
     ({"method": "pdd", "stages": 2, "stage_ipc": (2, 1)}, "--stage-ipc 2,1 must sum to --ipc 2"),
     ({"method": "pdd", "stages": 2, "union_sample": 3}, "--union-sample applies with --union-in"),
     ({"method": "pdd", "stages": 2, "teacher_save_epochs": (1, 2)},
      "--teacher-save-epochs applies to the teacher trained here, not to --teacher"),
     ({"method": "pdd", "stages": 2, "stage_teachers": "checkpoints", "teacher": None},
      "--stage-teachers checkpoints needs 2 teacher checkpoints: pass --teacher-save-epochs"),
     ({"method": "pdd", "stages": 2, "stage_teachers": "checkpoints", "teacher": None,
       "teacher_save_epochs": (2, 4)}, r"--teacher-save-epochs must lie in \[1, --teacher-ep"),
     ({"method": "pdd", "stages": 2, "stage_teachers": "checkpoints", "teacher": None,
       "teacher_save_epochs": (1, 2, 3)}, "--stages 2 needs 2 epochs, got 3")],
)  # fmt: skip
def test_bad_config_is_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, "t.pt", **overrides)


def test_a_copied_run_folder_is_reused_as_it_is_and_nothing_is_written(tmp_path, monkeypatch):
    # Issue 18 point 6: identities by content, so the copy's own teacher (at another path) and
    # selection are the recorded ones; selection does not run again, and no file is rewritten.
    import shutil

    def config(out):
        # No --teacher: trained into OUT/teacher (its flags are refused with one).
        return _config(out, "", teacher=None, arch="convnet1", width=4, teacher_epochs=1)

    first = distill(config(tmp_path / "run"))
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    before = {
        path: (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in (tmp_path / "copy").rglob("*")
        if path.is_file()  # (folders' mtimes change: the lock file comes and goes)
    }
    _forbid(
        monkeypatch, "delt.pipeline.recover", "delt.select.score_images",
        "delt.diversity.penultimate_features", "delt.teacher.build_model",
    )  # fmt: skip
    monkeypatch.setattr(StudentTrainer, "train_epoch", lambda *a: pytest.fail("trained again"))
    again = distill(config(tmp_path / "copy"))
    assert all(step["cached"] for step in again.steps)
    assert again.report == first.report
    after = {
        path: (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in (tmp_path / "copy").rglob("*")
        if path.is_file()  # (folders' mtimes change: the lock file comes and goes)
    }
    assert after == before


@pytest.mark.parametrize(
    "overrides, flags",
    [({"arch": "convnet2"}, "--arch"), ({"width": 16}, "--width"),
     ({"teacher_epochs": 5}, "--teacher-epochs"),
     ({"arch": "convnet4", "width": 8, "teacher_epochs": 1}, "--arch, --width, --teacher-epochs")],
)  # fmt: skip
def test_teacher_training_flags_are_refused_with_a_teacher(
    tiny_teacher, tmp_path, overrides, flags
):
    with pytest.raises(ConfigError) as error:
        _config(tmp_path, tiny_teacher.path, **overrides)
    verb = "apply" if "," in flags else "applies"
    assert str(error.value) == (
        f"{flags} {verb} to the teacher trained here, not to --teacher {tiny_teacher.path} (the "
        "student and every step use that teacher's architecture)"
    )
    assert _config(tmp_path, "", **{**overrides, "teacher": None}).arch  # without: fine


def test_teacher_training_flags_are_refused_by_the_cli(tiny_teacher, tmp_path, capsys):
    from delt.cli import main

    argv = ["distill", "--method", "cda", "--ipc", "2", "--out", str(tmp_path / "o"),
            "--dataset", SYNTHETIC, "--teacher", str(tiny_teacher.path),
            "--width", "16"]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"delt distill: error: --width applies to the teacher trained here, not to --teacher "
        f"{tiny_teacher.path} (the student and every step use that teacher's architecture)"
    )
    assert not (tmp_path / "o").exists()
