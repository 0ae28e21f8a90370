"""benchmarks/quality/run.py: method names (a method, one that optimizes pixels with its own
recovery step size, ``delt-lr0.05``, RDED with its own tiling, ``rded-factor1``, PDD's variants),
their settings per IPC, the teacher (trained with checkpoints for pdd+ckpt, or given), the gains
over random-real and the results files."""

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "run.py"


@pytest.fixture(scope="module")
def run_module():
    spec = importlib.util.spec_from_file_location("quality_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_methods_and_step_size_variants(run_module):
    assert run_module.parse_method("delt") == ("delt", {})
    assert run_module.parse_method("random-real") == ("random-real", {})
    assert run_module.parse_method("delt-lr0.05") == ("delt", {"recover_lr": 0.05})
    assert run_module.parse_method("cda-lr1e-2") == ("cda", {"recover_lr": 0.01})


def test_rded_factor_variants(run_module):
    assert run_module.parse_method("rded-factor1") == ("rded", {"factor": 1})
    assert run_module.parse_method("rded-factor4") == ("rded", {"factor": 4})


def test_pdd_variants_are_benchmarks_pdd_ones(run_module):
    parse = run_module.parse_method
    assert parse("pdd") == ("pdd", {})
    assert parse("pdd+ckpt") == ("pdd", {"stage_teachers": "checkpoints"})
    assert parse("pdd+union") == ("pdd", {"union_in_batch": True})
    assert parse("pdd+hard") == ("pdd", {"stage_init": "hard", "hard_student_epochs": 30})
    everything = {"stage_teachers": "checkpoints", "union_in_batch": True, "stage_init": "hard",
                  "hard_student_epochs": 30}  # fmt: skip
    assert parse("pdd+all") == ("pdd", everything)
    ckpt = {"stage_teachers": "checkpoints", "recover_lr": 0.05}
    assert parse("pdd+ckpt-lr0.05") == ("pdd", ckpt)


@pytest.mark.parametrize(
    "name",
    ["mtt", "rded-lr0.1", "random-real-lr0.1", "delt-lr0", "delt-lrx", "delt-factor1",
     "random-real-factor1", "pdd-factor1", "rded-factor0", "rded-factorx", "rded-factor",
     "rded-factor1-lr0.1", "pdd+foo", "pdd+ckpt-lr-1"],
)  # fmt: skip
def test_unknown_methods_are_refused(run_module, name):
    with pytest.raises(SystemExit, match=f"--methods: unknown '{re.escape(name)}'"):
        run_module.parse_method(name)


def _args(run_module, *flags):
    return run_module.parse_args(["--budget", "paper", *flags])


def test_method_settings_match_delts_image_iterations(run_module):
    # --budget paper: MI 4000, RI 500. pdd: 5 stages with the per-stage MI/RI of
    # delt.schedules.pdd_matched_iterations (IPC 10: 2720/340; IPC 50: 3624/453).
    args = _args(run_module)
    settings = run_module.method_settings
    assert settings("pdd", {}, 10, args) == {"stages": 5, "iterations": 2720,
                                             "round_iterations": 340}  # fmt: skip
    union = settings("pdd", {"union_in_batch": True}, 50, args)
    assert union == {"stages": 5, "iterations": 3624, "round_iterations": 453,
                     "union_in_batch": True, "union_sample": 100}  # fmt: skip
    assert settings("delt", {}, 10, args) == {"iterations": 4000, "round_iterations": 500}
    assert settings("cda", {"recover_lr": 0.05}, 10, args) == {
        "iterations": 4000, "round_iterations": None, "recover_lr": 0.05}  # fmt: skip
    assert settings("rded", {"factor": 1}, 10, args) == {"factor": 1}
    # The short budget (MI 400, RI 50): benchmarks/pdd's 272/34 at IPC 10.
    short = run_module.parse_args([])
    assert settings("pdd", {}, 10, short)["iterations"] == 272


def test_save_epochs_are_one_per_stage_ending_at_the_last(run_module):
    assert run_module.save_epochs(10) == (2, 4, 6, 8, 10)
    assert run_module.save_epochs(12) == (2, 4, 7, 9, 12)
    assert run_module.save_epochs(5) == (1, 2, 3, 4, 5)
    with pytest.raises(SystemExit, match="--teacher-epochs 4: .* >= 5 epochs"):
        run_module.save_epochs(4)


class _Stop(Exception):
    pass


def _fake_pipeline(monkeypatch, tmp_path, teacher_configs=None, **fakes):
    """train_teacher records its config (a fake teacher in tmp_path); distill stops."""
    import delt.distill
    import delt.teacher

    seen = []

    def train_teacher(config):
        if teacher_configs is None:
            pytest.fail("a teacher was trained")
        teacher_configs.append(config)
        return SimpleNamespace(path=Path(config.out) / "teacher.pt", test_accuracy=90.0)

    def distill(config, print_summary=True):
        seen.append(config)
        raise _Stop

    monkeypatch.setattr(delt.teacher, "train_teacher", fakes.get("train_teacher", train_teacher))
    monkeypatch.setattr(delt.distill, "distill", fakes.get("distill", distill))
    return seen


def test_pdd_ckpt_trains_the_teacher_with_checkpoints(run_module, tmp_path, monkeypatch):
    import delt.methods.pdd

    teachers = []
    seen = _fake_pipeline(monkeypatch, tmp_path, teachers)
    monkeypatch.setattr(delt.methods.pdd, "stage_checkpoints", lambda config, path: [])
    with pytest.raises(_Stop):
        run_module.main(["--budget", "paper", "--out", str(tmp_path), "--ipcs", "10",
                         "--methods", "pdd+ckpt"])  # fmt: skip
    (teacher,) = teachers
    assert teacher.save_epochs == (2, 4, 6, 8, 10)
    (config,) = seen
    assert (config.method, config.stages, config.base) == ("pdd", 5, None)  # base: delt
    assert config.stage_teachers == "checkpoints" and config.starts_from_selection
    assert (config.iterations, config.round_iterations) == (2720, 340)
    assert Path(config.out) == tmp_path / "pdd+ckpt" / "ipc10" / "seed0"


def test_without_pdd_ckpt_the_teacher_needs_no_checkpoints(run_module, tmp_path, monkeypatch):
    # An earlier OUT/teacher, trained without them, stays usable by every other method.
    teachers = []
    seen = _fake_pipeline(monkeypatch, tmp_path, teachers)
    with pytest.raises(_Stop):
        run_module.main(["--out", str(tmp_path), "--ipcs", "10", "--methods", "pdd+hard,delt"])
    assert teachers[0].save_epochs is None and seen[0].stage_init == "hard"


def test_a_teacher_without_checkpoints_is_refused_before_any_run(run_module, tmp_path, monkeypatch):
    from delt.config import ConfigError

    # The real check (delt.methods.pdd.stage_checkpoints): the fake teacher has no teacher.json.
    _fake_pipeline(monkeypatch, tmp_path, [], distill=lambda *a, **k: pytest.fail("ran"))
    argv = ["--out", str(tmp_path), "--ipcs", "10", "--methods", "delt,pdd+all"]
    with pytest.raises(SystemExit, match="--methods pdd\\+all: .*needs 5 teacher checkpoints"):
        run_module.main(argv)

    def cached_without_checkpoints(config):
        raise ConfigError("--save-epochs 2,4,6,8,10: teacher.pt was trained without checkpoints")

    _fake_pipeline(monkeypatch, tmp_path, train_teacher=cached_without_checkpoints,
                   distill=lambda *a, **k: pytest.fail("ran"))  # fmt: skip
    with pytest.raises(SystemExit, match="needs the teacher's checkpoints: --save-epochs"):
        run_module.main(argv)


def test_pdd_at_an_ipc_below_its_stages_is_refused_before_any_work(
    run_module, tmp_path, monkeypatch
):
    _fake_pipeline(monkeypatch, tmp_path)  # no teacher may be trained
    with pytest.raises(SystemExit, match=r"--methods pdd at IPC 1: stages \(5\) must be <= ipc"):
        run_module.main(["--out", str(tmp_path), "--methods", "delt,pdd"])  # IPC 1, 10, 50


def test_an_existing_teacher_is_used_and_recorded(run_module, tmp_path, monkeypatch):
    import delt.models

    given = tmp_path / "t" / "checkpoints" / "epoch-002.pt"
    monkeypatch.setattr(delt.models, "load_checkpoint",
                        lambda path: SimpleNamespace(meta={"test_accuracy": 80.0}))  # fmt: skip
    seen = _fake_pipeline(monkeypatch, tmp_path)  # no teacher may be trained
    with pytest.raises(_Stop):
        run_module.main(["--out", str(tmp_path / "weak"), "--ipcs", "10", "--methods", "cda",
                         "--teacher", str(given)])  # fmt: skip
    assert seen[0].teacher == str(given)
    run = tmp_path / "weak" / "cda" / "ipc10" / "seed0"
    run.mkdir(parents=True)
    report = {"method": "cda", "dataset": "fashion-mnist", "ipc": 10, "accuracy_mean": 70.0,
              "accuracy_std": 0.0, "diversity": 0.9, "synthesis_seconds": 1.0,
              "image_iterations": 10}  # fmt: skip
    (run / "report.json").write_text(json.dumps(report))
    run_module.main(["--out", str(tmp_path / "weak"), "--ipcs", "10", "--methods", "cda",
                     "--teacher", str(given), "--report-only"])  # fmt: skip
    document = json.loads((tmp_path / "weak" / "results.json").read_text())
    assert document["args"]["teacher"] == str(given)


def test_students_land_in_the_other_evaluations_table(run_module, tmp_path, monkeypatch):
    # --students: RUN/distilled/eval-STUDENT.json, tested every --students-eval-every epochs,
    # listed by results.md's other evaluations; no table of its own.
    import delt.evaluate

    def distill(config, print_summary=True):
        accuracy = {"random-real": 80.0, "delt": 83.0}[config.method]
        report = {"method": config.method, "dataset": "fashion-mnist", "ipc": config.ipc,
                  "accuracy_mean": accuracy, "accuracy_std": 0.0, "diversity": 0.9,
                  "synthesis_seconds": 1.0, "image_iterations": 10}  # fmt: skip
        (Path(config.out) / "distilled").mkdir(parents=True)
        (Path(config.out) / "report.json").write_text(json.dumps(report))
        return SimpleNamespace(report=report, evaluation=SimpleNamespace(final_mean=accuracy),
                               steps=[{"cached": False}])  # fmt: skip

    def evaluate(config):
        accuracy = 70.0 if "random-real" in config.distilled else 74.0
        _eval_file(Path(config.out), 10, config.seeds[0], accuracy, student=config.student,
                   student_width=config.student_width, eval_every=config.eval_every,
                   student_kwargs={"width": config.student_width})  # fmt: skip
        return SimpleNamespace(accuracy_mean=accuracy, document={"wall_seconds": 1.0},
                               reused=False)  # fmt: skip

    _fake_pipeline(monkeypatch, tmp_path, [], distill=distill)
    monkeypatch.setattr(delt.evaluate, "evaluate", evaluate)
    run_module.main(["--out", str(tmp_path), "--ipcs", "10", "--seeds", "0",
                     "--methods", "random-real,delt", "--students", "convnet4",
                     "--students-eval-every", "25"])  # fmt: skip
    assert (tmp_path / "delt" / "ipc10" / "seed0" / "distilled" / "eval-convnet4.json").is_file()
    markdown = (tmp_path / "results.md").read_text()
    row = "| 10 | convnet4 | convnet4 w64, 100 epochs, tested every 25 | delt | 1 | 74.00"
    assert row in markdown
    assert "+4.00 ± 0.00 |" in markdown
    assert not list(tmp_path.glob("results-students*"))


def test_the_variant_reaches_distill(run_module, tmp_path, monkeypatch):
    # The folder is the variant's name; the config is the base method with the step size.
    import delt.distill
    import delt.teacher

    seen = []

    class Stop(Exception):
        pass

    def fake_distill(config, print_summary=True):
        seen.append(config)
        raise Stop

    class Teacher:
        path, test_accuracy = tmp_path / "teacher.pt", 90.0

    monkeypatch.setattr(delt.teacher, "train_teacher", lambda config: Teacher)
    monkeypatch.setattr(delt.distill, "distill", fake_distill)
    with pytest.raises(Stop):
        run_module.main(["--out", str(tmp_path), "--ipcs", "10", "--methods", "delt-lr0.05"])
    (config,) = seen
    assert config.method == "delt" and config.recover_lr == 0.05
    assert Path(config.out) == tmp_path / "delt-lr0.05" / "ipc10" / "seed0"


def test_gains_over_random_real_are_paired_by_seed(run_module):
    def report(ipc, accuracy):
        return {"ipc": ipc, "accuracy_mean": accuracy}

    reports = [
        ("random-real", 0, report(10, 80.0)), ("random-real", 1, report(10, 82.0)),
        ("delt", 0, report(10, 81.0)), ("delt", 1, report(10, 85.0)),
        ("delt", 2, report(10, 99.0)),  # no random-real seed 2: not paired
        ("rded", 0, report(50, 70.0)),  # no random-real at IPC 50
    ]  # fmt: skip
    (row,) = run_module.paired_gains(reports)
    assert row["ipc"] == 10 and row["method"] == "delt" and row["gains"] == {0: 1.0, 1: 3.0}
    assert row["mean"] == pytest.approx(2.0) and row["std"] == pytest.approx(1.0)


def test_report_only_pools_variants_apart_and_runs_nothing(run_module, tmp_path, monkeypatch):
    import delt.distill
    import delt.teacher

    monkeypatch.setattr(delt.teacher, "train_teacher", lambda c: pytest.fail("trained"))
    monkeypatch.setattr(delt.distill, "distill", lambda *a, **k: pytest.fail("ran"))
    accuracies = {("random-real", 0): 80.0, ("random-real", 1): 82.0, ("delt", 0): 81.0,
                  ("delt", 1): 84.0, ("delt-lr0.05", 0): 83.0}  # fmt: skip
    for (method, seed), accuracy in accuracies.items():
        run = tmp_path / method / "ipc10" / f"seed{seed}"
        run.mkdir(parents=True)
        report = {"method": method.split("-lr")[0], "dataset": "fashion-mnist", "ipc": 10,
                  "accuracy_mean": accuracy, "accuracy_std": 0.0, "diversity": 0.9,
                  "synthesis_seconds": 1.0, "image_iterations": 0 if seed else 10}  # fmt: skip
        (run / "report.json").write_text(json.dumps(report))
    args = ["--out", str(tmp_path), "--ipcs", "10", "--seeds", "0,1", "--report-only"]
    run_module.main([*args, "--methods", "random-real,delt,delt-lr0.05,cda"])
    document = json.loads((tmp_path / "results.json").read_text())
    rows = {row["method"]: row for row in document["rows"]}
    assert list(rows) == ["random-real", "delt", "delt-lr0.05"]  # cda: no finished run
    assert rows["delt"]["runs"] == 2 and rows["delt"]["accuracy_mean"] == pytest.approx(82.5)
    assert rows["delt-lr0.05"]["runs"] == 1
    gains = {row["method"]: row for row in document["gains"]}
    assert gains["delt"]["mean"] == pytest.approx(1.5) and gains["delt-lr0.05"]["mean"] == 3.0
    markdown = (tmp_path / "results.md").read_text()
    assert "| 10 | delt | 0: +1.00, 1: +2.00 | +1.50 ± 0.50 |" in markdown
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results-gains.png").read_bytes()[:4] == b"\x89PNG"


def _fake_run(out: Path, method: str, ipc: int, seed: int, accuracy: float, seconds: float):
    run = out / method / f"ipc{ipc}" / f"seed{seed}"
    run.mkdir(parents=True)
    report = {"method": method, "dataset": "fashion-mnist", "ipc": ipc, "accuracy_mean": accuracy,
              "accuracy_std": 0.0, "diversity": 0.9, "synthesis_seconds": seconds,
              "image_iterations": 0 if method == "random-real" else 4_000_000}  # fmt: skip
    (run / "report.json").write_text(json.dumps(report))


def test_the_gains_chart_is_written_with_one_seed_and_unpaired_methods(
    run_module, tmp_path, monkeypatch
):
    # IPC 10: one seed of random-real, delt and rded (rded paired); IPC 50: delt and rded
    # without a random-real run, so no gain at all. --report-only: nothing runs.
    import delt.distill

    monkeypatch.setattr(delt.distill, "distill", lambda *a, **k: pytest.fail("ran"))
    for method, ipc, accuracy, seconds in [
        ("random-real", 10, 80.0, 0.0), ("delt", 10, 83.0, 900.0), ("rded", 10, 78.0, 40.0),
        ("delt", 50, 88.0, 4000.0), ("rded", 50, 84.0, 0.0),
    ]:  # fmt: skip
        _fake_run(tmp_path, method, ipc, 0, accuracy, seconds)
    run_module.main(["--out", str(tmp_path), "--ipcs", "10,50", "--seeds", "0", "--report-only",
                     "--methods", "random-real,delt,rded"])  # fmt: skip
    document = json.loads((tmp_path / "results.json").read_text())
    assert {(g["ipc"], g["method"]) for g in document["gains"]} == {(10, "delt"), (10, "rded")}
    chart = tmp_path / "results-gains.png"
    assert chart.read_bytes()[:4] == b"\x89PNG" and chart.stat().st_size > 10_000


def test_plot_gains_without_any_pairing_or_cost(run_module, tmp_path):
    # --synthesis once (no gains), a gain whose method has no pooled row, a zero-second method.
    rows = [
        {"method": "delt", "ipc": 10, "synthesis_seconds": 0.0, "image_iterations": 0},
        {"method": "cda", "ipc": 10, "synthesis_seconds": 5.0, "image_iterations": 10},
    ]
    run_module.plot_gains([], rows, tmp_path / "none.png")
    gains = [
        {"ipc": 10, "method": "delt", "gains": {0: 1.0, 1: 2.0}, "mean": 1.5, "std": 0.5},
        {"ipc": 50, "method": "sre2l", "gains": {0: -1.0}, "mean": -1.0, "std": 0.0},
    ]
    run_module.plot_gains(gains, rows, tmp_path / "some.png", "title")
    run_module.plot_gains([], [], tmp_path / "empty.png")
    for name in ("none", "some", "empty"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def _eval_file(path: Path, ipc: int, seed: int, accuracy: float, **config) -> None:
    """A finished eval document (the keys other_evaluations reads): its identity config is
    delt eval's, ConvNet-3 w64 at 100 epochs tested every 50 unless ``config`` says otherwise
    (``shuffle_patches`` is absent unless given, as delt eval writes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = {"student": "convnet3", "student_kwargs": {"width": 64}, "student_width": None,
                "epochs": 100, "eval_every": 50, "batch_size": 100 if ipc >= 50 else 50,
                "temperature": 20.0, "lr": 0.001, "weight_decay": 0.01, "cutmix_beta": 1.0,
                "randaugment_ops": 2, "randaugment_magnitude": 6, "min_crop": 0.25,
                "hard_labels": False, "random_real": False, "ipc": ipc, "amp": "none",
                "channels_last": False, **config}  # fmt: skip
    document = {"complete": True, "ipc": ipc, "num_images": 10 * ipc,
                "identity": {"config": identity, "teacher_sha256": "t", "distilled_sha256": "d",
                             "dataset": "fashion-mnist"},
                "config": {"seeds": [seed], "device": "cpu", **identity},
                "seeds": [{"seed": seed, "best_accuracy": accuracy}]}  # fmt: skip
    path.write_text(json.dumps(document))


def test_other_evaluations_pool_by_name_and_pair_with_random_real(run_module, tmp_path):
    runs = []
    values = {("random-real", 0): 70.0, ("random-real", 1): 72.0, ("delt", 0): 75.0,
              ("delt", 1): 74.0, ("rded", 1): 60.0}  # fmt: skip
    for (method, seed), accuracy in values.items():
        run = tmp_path / method / "ipc10" / f"seed{seed}"
        _eval_file(run / "distilled" / "eval-100ep.json", 10, seed, accuracy)
        _eval_file(run / "distilled" / "eval.json", 10, seed, 99.0)  # the run's own: not listed
        runs.append((method, str(run)))
    shuffled = tmp_path / "rded" / "ipc10" / "seed1" / "distilled" / "eval-shuffle2.json"
    _eval_file(shuffled, 10, 1, 65.0, epochs=300, eval_every=10, shuffle_patches=2,
               min_crop=0.5, randaugment_ops=0)  # fmt: skip
    rows = run_module.other_evaluations(runs)
    assert [(r["evaluation"], r["method"]) for r in rows] == [
        ("100ep", "random-real"),
        ("100ep", "delt"),
        ("100ep", "rded"),
        ("shuffle2", "rded"),
    ]
    baseline, delt, rded, shuffle = rows
    assert baseline["mean"] == pytest.approx(71.0) and "gains" not in baseline
    assert baseline["protocol"] == "convnet3 w64, 100 epochs, tested every 50"
    assert delt["gains"] == {0: 5.0, 1: 2.0} and delt["gain_mean"] == pytest.approx(3.5)
    assert delt["gain_std"] == pytest.approx(1.5)
    assert rded["gains"] == {1: -12.0}
    assert shuffle["protocol"] == (
        "convnet3 w64, 300 epochs, tested every 10, ShufflePatches 2, min crop 0.5, RandAugment off"
    )
    assert "gains" not in shuffle  # random-real has no shuffle2 evaluation to pair with


def test_the_printed_protocol_names_every_setting_off_the_defaults(run_module, tmp_path):
    run = tmp_path / "delt" / "ipc10" / "seed0"
    _eval_file(run / "distilled" / "eval-odd.json", 10, 0, 80.0, student="resnet18_small",
               student_kwargs={}, randaugment_magnitude=9, cutmix_beta=0.0, temperature=4.0,
               amp="bf16", batch_size=20, hard_labels=True)  # fmt: skip
    (row,) = run_module.other_evaluations([("delt", str(run))])
    assert row["protocol"] == (
        "resnet18_small, 100 epochs, tested every 50, RandAugment rand-m9-n2, CutMix off, "
        "hard labels, --temperature 4.0, --amp bf16, batch 20"
    )


def test_one_evaluation_name_means_one_protocol(run_module, tmp_path):
    a, b = tmp_path / "random-real" / "ipc10" / "seed0", tmp_path / "delt" / "ipc10" / "seed0"
    _eval_file(a / "distilled" / "eval-long.json", 10, 0, 80.0, epochs=300)
    _eval_file(b / "distilled" / "eval-long.json", 10, 0, 81.0, epochs=200)
    with pytest.raises(SystemExit, match="eval-long.json: protocol .* differs"):
        run_module.other_evaluations([("random-real", str(a)), ("delt", str(b))])


@pytest.mark.parametrize(
    "other, difference",
    [({"student_kwargs": {"width": 128}}, "'convnet4 w128, .*--student-kwargs"),
     ({"min_crop": 0.5}, "min crop 0.5.*--min-crop: 0.25 -> 0.5"),
     ({"randaugment_ops": 0}, "RandAugment off.*--randaugment-ops: 2 -> 0"),
     ({"batch_size": 25}, "batch 25.*--batch-size: 50 -> 25"),
     ({"temperature": 4.0}, "--temperature: 20.0 -> 4.0"),
     ({"hard_labels": True}, "hard labels"),
     ({"shuffle_patches": 2}, "ShufflePatches 2.*--shuffle-patches: None -> 2")],
)  # fmt: skip
def test_a_name_with_another_training_protocol_is_refused_by_file(
    run_module, tmp_path, other, difference
):
    # Beyond what the protocol column used to print: the student's width, the crop, the batch...
    a, b = tmp_path / "random-real" / "ipc10" / "seed0", tmp_path / "delt" / "ipc10" / "seed0"
    _eval_file(a / "distilled" / "eval-convnet4.json", 10, 0, 80.0, student="convnet4")
    _eval_file(b / "distilled" / "eval-convnet4.json", 10, 0, 81.0, student="convnet4", **other)
    pattern = re.escape(str(b / "distilled" / "eval-convnet4.json")) + ": protocol .*" + difference
    with pytest.raises(SystemExit, match=pattern):
        run_module.other_evaluations([("random-real", str(a)), ("delt", str(b))])


def test_what_legitimately_differs_under_one_name_is_pooled(run_module, tmp_path):
    # Per IPC (batch sizes default by IPC); the requested --student-width (the resolved width
    # is the same), the memory format, --random-real, the workers' random stream.
    runs = []
    for method, ipc, config in [
        ("random-real", 10, {"random_real": True, "channels_last": True}),
        ("delt", 10, {"student_width": 64, "augmentation": "workers: per-batch seeds"}),
        ("delt", 50, {}),
    ]:  # fmt: skip
        run = tmp_path / method / f"ipc{ipc}" / "seed0"
        _eval_file(run / "distilled" / "eval-100ep.json", ipc, 0, 80.0, **config)
        runs.append((method, str(run)))
    rows = run_module.other_evaluations(runs)
    assert [(r["ipc"], r["method"]) for r in rows] == [(10, "random-real"), (10, "delt"),
                                                       (50, "delt")]  # fmt: skip
    assert {r["protocol"] for r in rows} == {"convnet3 w64, 100 epochs, tested every 50"}


def test_students_eval_every_defaults_to_eval_every_and_is_checked(run_module, capsys):
    assert run_module.parse_args(["--budget", "paper"]).students_eval_every == 10
    assert run_module.parse_args(["--eval-every", "7"]).students_eval_every == 7
    assert run_module.parse_args(["--students-eval-every", "100"]).students_eval_every == 100
    with pytest.raises(SystemExit):
        run_module.parse_args(["--students-eval-every", "0"])
    assert "--students-eval-every: expected a positive number of epochs, got 0" in (
        capsys.readouterr().err
    )


def _log_line(out: Path, method: str, ipc: int, seed: int, accuracy: float) -> str:
    # run.py's progress.jsonl record: the report's eight keys, then the run's own.
    report = {"method": method.split("-lr")[0], "dataset": "fashion-mnist", "ipc": ipc,
              "accuracy_mean": accuracy, "accuracy_std": 0.0, "diversity": 0.9,
              "synthesis_seconds": 2.0, "image_iterations": 7}  # fmt: skip
    return json.dumps({**report, "run": str(out / "elsewhere" / method / f"ipc{ipc}" /
                       f"seed{seed}"), "variant": method, "seed": seed, "eval_seeds": [seed],
                       "final_mean": accuracy, "cached": False, "wall_seconds": 3.0,
                       "steps": [], "finished": "2026-12-07 00:00:00"})  # fmt: skip


def test_report_only_reports_runs_whose_folders_are_gone_from_the_progress_log(
    run_module, tmp_path, monkeypatch
):
    # The folders of random-real and delt seed 0 are gone; their lines in progress.jsonl remain
    # (the older line of delt seed 0 is superseded). delt seed 1 has its folder. A folder
    # without report.json (a run under way) is not reported from an old line.
    import delt.distill

    monkeypatch.setattr(delt.distill, "distill", lambda *a, **k: pytest.fail("ran"))
    lines = [_log_line(tmp_path, "delt", 10, 0, 70.0), _log_line(tmp_path, "random-real", 10, 0,
             80.0), _log_line(tmp_path, "delt", 10, 0, 81.5), _log_line(tmp_path, "cda", 10, 0,
             60.0)]  # fmt: skip
    (tmp_path / "progress.jsonl").write_text("\n".join(lines) + "\n\n")
    _fake_run(tmp_path, "random-real", 10, 1, 82.0, 0.5)
    _fake_run(tmp_path, "delt", 10, 1, 84.0, 5.0)
    (tmp_path / "cda" / "ipc10" / "seed0").mkdir(parents=True)
    run_module.main(["--out", str(tmp_path), "--ipcs", "10", "--seeds", "0,1", "--report-only",
                     "--methods", "random-real,delt,cda"])  # fmt: skip
    document = json.loads((tmp_path / "results.json").read_text())
    rows = {row["method"]: row for row in document["rows"]}
    assert list(rows) == ["random-real", "delt"]
    assert rows["delt"]["runs"] == 2 and rows["delt"]["accuracy_mean"] == pytest.approx(82.75)
    assert (
        "| 10 | delt | 0: +1.50, 1: +2.00 | +1.75 ± 0.25 |" in (tmp_path / "results.md").read_text()
    )


def test_report_only_refuses_a_bad_progress_line_by_file_and_line(run_module, tmp_path):
    good = _log_line(tmp_path, "delt", 10, 0, 80.0)
    (tmp_path / "progress.jsonl").write_text(good + "\n{not json\n")
    args = ["--out", str(tmp_path), "--ipcs", "10", "--seeds", "0", "--report-only"]
    with pytest.raises(SystemExit, match=r"progress.jsonl:2: expected a run's JSON record"):
        run_module.main(args)
    record = json.loads(good)
    del record["accuracy_std"]
    (tmp_path / "progress.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(SystemExit, match=r"progress.jsonl:1: keys must be"):
        run_module.main(args)
