"""benchmarks/quality/run.py: method names (a method, one that optimizes pixels with its own
recovery step size, ``delt-lr0.05``, RDED with its own tiling, ``rded-factor1``, PDD's variants),
their settings per IPC, the teacher (trained with checkpoints for pdd+ckpt, or given), the gains
over random-real and the results files (the pooling and pairing: tests/test_comparison.py); the
committed tables regenerate from their progress logs."""

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_comparison import write_eval_document

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "run.py"


@pytest.fixture(scope="module")
def run_module():
    spec = importlib.util.spec_from_file_location("quality_run", RUN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


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
    import delt.pipeline
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
    monkeypatch.setattr(delt.pipeline, "distill", fakes.get("distill", distill))
    return seen


def test_pdd_ckpt_trains_the_teacher_with_checkpoints(run_module, tmp_path, monkeypatch):
    import delt.methods.pdd

    teachers = []
    seen = _fake_pipeline(monkeypatch, tmp_path, teachers)
    monkeypatch.setattr(delt.methods.pdd, "stage_checkpoints", lambda config, path: [])
    with pytest.raises(_Stop):
        run_module.main(
            ["--budget", "paper", "--out", str(tmp_path), "--ipcs", "10", "--methods", "pdd+ckpt"]
        )
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
    monkeypatch.setattr(
        delt.models, "load_checkpoint", lambda path: SimpleNamespace(meta={"test_accuracy": 80.0})
    )
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
    import delt.compare
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
        write_eval_document(
            Path(config.out), 10, config.seeds[0], accuracy, student=config.student,
            student_width=config.student_width, eval_every=config.eval_every,
            student_kwargs={"width": config.student_width},
        )  # fmt: skip
        return SimpleNamespace(accuracy_mean=accuracy, document={"wall_seconds": 1.0}, reused=False)

    def run_compare(compare_config):
        # delt compare of the run's set: the evaluation delt distill made, named by compare.json.
        (folder,) = compare_config.sets
        accuracy = 80.0 if "random-real" in folder else 83.0
        document = {"budgets": [{"evaluations": [
            {"mean": accuracy, "std": 0.0, "eval": f"{folder}/eval.json"}]}]}  # fmt: skip
        return SimpleNamespace(out=Path(compare_config.out), document=document)

    _fake_pipeline(monkeypatch, tmp_path, [], distill=distill)
    monkeypatch.setattr(delt.evaluate, "evaluate", evaluate)
    monkeypatch.setattr(delt.compare, "run_compare", run_compare)
    run_module.main(["--out", str(tmp_path), "--ipcs", "10", "--seeds", "0",
                     "--methods", "random-real,delt", "--students", "convnet4",
                     "--students-eval-every", "25"])  # fmt: skip
    assert (tmp_path / "delt" / "ipc10" / "seed0" / "distilled" / "eval-convnet4.json").is_file()
    markdown = (tmp_path / "results.md").read_text()
    row = "| 10 | convnet4 | convnet4 w64, 100 epochs, tested every 25 | delt | 1 | 74.00"
    assert row in markdown
    assert "+4.00 ± 0.00 |" in markdown
    assert not list(tmp_path.glob("results-students*"))
    (line, _) = (tmp_path / "progress.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["compare"] == str(tmp_path / "random-real/ipc10/seed0/compare/compare.json")
    assert record["eval"].endswith("random-real/ipc10/seed0/distilled/eval.json")


def test_the_variant_reaches_distill(run_module, tmp_path, monkeypatch):
    # The folder is the variant's name; the config is the base method with the step size.
    import delt.pipeline
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
    monkeypatch.setattr(delt.pipeline, "distill", fake_distill)
    with pytest.raises(Stop):
        run_module.main(["--out", str(tmp_path), "--ipcs", "10", "--methods", "delt-lr0.05"])
    (config,) = seen
    assert config.method == "delt" and config.recover_lr == 0.05
    assert Path(config.out) == tmp_path / "delt-lr0.05" / "ipc10" / "seed0"


def test_per_class_matching_variants_reach_distill_with_the_stats(
    run_module, tmp_path, monkeypatch
):
    # sre2l+class (WMDD's --match class) and cda+class-mean (EDC's, half global), with --stats.
    import delt.pipeline
    import delt.teacher

    assert run_module.parse_method("sre2l+class") == ("sre2l", {"match": "class"})
    assert run_module.parse_method("cda+class-mean") == (
        "cda",
        {"match": "class-mean", "match_class_weight": 0.5},
    )
    seen = []

    class Stop(Exception):
        pass

    def fake_distill(config, print_summary=True):
        seen.append(config)
        raise Stop

    class Teacher:
        path, test_accuracy = tmp_path / "teacher.pt", 90.0

    monkeypatch.setattr(delt.teacher, "train_teacher", lambda config: Teacher)
    monkeypatch.setattr(delt.pipeline, "distill", fake_distill)
    for method in ("sre2l+class", "cda+class-mean"):
        with pytest.raises(Stop):
            run_module.main(["--out", str(tmp_path), "--ipcs", "10", "--methods", method,
                             "--stats", str(tmp_path / "stats.pt")])  # fmt: skip
    wmdd, edc = seen
    assert (wmdd.method, wmdd.match, wmdd.match_class_weight) == ("sre2l", "class", None)
    assert (edc.method, edc.match, edc.match_class_weight) == ("cda", "class-mean", 0.5)
    assert wmdd.stats == edc.stats == str(tmp_path / "stats.pt")
    assert Path(edc.out) == tmp_path / "cda+class-mean" / "ipc10" / "seed0"


def test_report_only_pools_variants_apart_and_runs_nothing(run_module, tmp_path, monkeypatch):
    import delt.pipeline
    import delt.teacher

    monkeypatch.setattr(delt.teacher, "train_teacher", lambda c: pytest.fail("trained"))
    monkeypatch.setattr(delt.pipeline, "distill", lambda *a, **k: pytest.fail("ran"))
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
    import delt.pipeline

    monkeypatch.setattr(delt.pipeline, "distill", lambda *a, **k: pytest.fail("ran"))
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
    import delt.pipeline

    monkeypatch.setattr(delt.pipeline, "distill", lambda *a, **k: pytest.fail("ran"))
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


COMMITTED = RUN.parent
# The committed result folders whose run folders are gone: --report-only rebuilds them from their
# progress.jsonl, with every table; the other evaluations lived in the lost folders, so where
# there were some, the rebuilt results.md is the committed one up to that table.
TABLES = {"paper-b/ipc50": True, "paper-b/weak-teacher": True, "paper-b": False,
          "paper-b/other-students": False, "paper-a": False, "per-class": True}  # fmt: skip


@pytest.mark.parametrize("folder, complete", list(TABLES.items()))
def test_committed_tables_regenerate_from_their_progress_logs(
    run_module, tmp_path, monkeypatch, folder, complete
):
    import delt.pipeline

    monkeypatch.setattr(delt.pipeline, "distill", lambda *a, **k: pytest.fail("ran"))
    committed = COMMITTED / folder
    saved = json.loads((committed / "results.json").read_text())
    (tmp_path / "progress.jsonl").write_bytes((committed / "progress.jsonl").read_bytes())
    argv = []  # the flags that wrote it, as results.json recorded them
    for key, value in saved["args"].items():
        name = "--" + key.replace("_", "-")
        if key == "out":
            value = str(tmp_path)
        if isinstance(value, bool):
            argv += [name] if value else []
        elif value is not None:
            argv += [name, str(value)]
    assert run_module.main(argv) == 0
    markdown = (tmp_path / "results.md").read_text()
    expected = (committed / "results.md").read_text()
    if complete:
        assert markdown == expected
    else:
        kept = expected.split("\nOther evaluations of the same sets")[0]
        assert markdown == kept.rstrip("\n") + "\n" and kept != expected
    document = json.loads((tmp_path / "results.json").read_text())
    for key in ("rows", "gains", "runs") + (("evaluations",) if complete else ()):
        assert json.dumps(document[key], indent=2) == json.dumps(saved[key], indent=2), key
    assert {**saved["args"], "out": str(tmp_path)}.items() <= document["args"].items()
    assert list(document) == list(saved)


def test_delt_compare_reuses_the_evaluation_delt_distill_made(
    run_module, tiny_set, tiny_teacher, tmp_path, monkeypatch
):
    # run.py's path: delt distill evaluates the run's set (DistillConfig.eval_config), then
    # delt compare of that set (compare_config) names that very eval.json and trains nothing.
    import shutil

    import delt.student_trainer
    from delt.compare import run_compare
    from delt.evaluate import evaluate

    config = run_module.parse_args(
        ["--out", str(tmp_path), "--ipcs", "2", "--seeds", "1", "--methods", "cda",
         "--teacher", str(tiny_teacher.path), "--eval-epochs", "2", "--eval-every", "1",
         "--amp", "none", "--students", ""]
    )  # fmt: skip
    (job,) = run_module.plan_jobs(config)
    distilled = job.folder / "distilled"
    shutil.copytree(tiny_set, distilled, ignore=shutil.ignore_patterns("eval*", "chunks", ".lock"))
    made = evaluate(job.distill.eval_config(distilled, str(tiny_teacher.path)))
    assert made.path == distilled / "eval.json" and not made.reused

    def no_training(*args, **kwargs):
        raise AssertionError("delt compare trained again")

    monkeypatch.setattr(delt.student_trainer.StudentTrainer, "train_epoch", no_training)
    compared = run_compare(run_module.compare_config(config, job))
    accuracy, std, source = run_module.compared_accuracy(compared.document)
    assert source == str(distilled / "eval.json")
    assert (accuracy, std) == (made.accuracy_mean, made.accuracy_std)
    assert compared.document["seeds"] == [1] and compared.document["epochs"] == [2]
    assert (job.folder / "compare" / "compare.json").is_file()
