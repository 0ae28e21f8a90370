"""benchmarks/quality/run.py: method names (a method, or one that optimizes pixels with its own
recovery step size, ``delt-lr0.05``), the gains over random-real and the results files."""

import importlib.util
import json
from pathlib import Path

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


@pytest.mark.parametrize("name", ["mtt", "rded-lr0.1", "random-real-lr0.1", "delt-lr0", "delt-lrx"])
def test_unknown_methods_are_refused(run_module, name):
    with pytest.raises(SystemExit, match=f"--methods: unknown '{name}'"):
        run_module.parse_method(name)


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


def _eval_file(path: Path, ipc: int, seed: int, accuracy: float, **config) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"student": "convnet3", "epochs": 100, "eval_every": 50, "shuffle_patches": None,
              **config}  # fmt: skip
    document = {"complete": True, "ipc": ipc, "config": config,
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
    _eval_file(shuffled, 10, 1, 65.0, epochs=300, eval_every=10, shuffle_patches=2)
    rows = run_module.other_evaluations(runs)
    assert [(r["evaluation"], r["method"]) for r in rows] == [
        ("100ep", "random-real"),
        ("100ep", "delt"),
        ("100ep", "rded"),
        ("shuffle2", "rded"),
    ]
    baseline, delt, rded, shuffle = rows
    assert baseline["mean"] == pytest.approx(71.0) and "gains" not in baseline
    assert delt["gains"] == {0: 5.0, 1: 2.0} and delt["gain_mean"] == pytest.approx(3.5)
    assert delt["gain_std"] == pytest.approx(1.5)
    assert rded["gains"] == {1: -12.0}
    assert shuffle["protocol"] == "convnet3, 300 epochs, tested every 10, ShufflePatches 2"
    assert "gains" not in shuffle  # random-real has no shuffle2 evaluation to pair with


def test_one_evaluation_name_means_one_protocol(run_module, tmp_path):
    a, b = tmp_path / "random-real" / "ipc10" / "seed0", tmp_path / "delt" / "ipc10" / "seed0"
    _eval_file(a / "distilled" / "eval-long.json", 10, 0, 80.0, epochs=300)
    _eval_file(b / "distilled" / "eval-long.json", 10, 0, 81.0, epochs=200)
    with pytest.raises(SystemExit, match="eval-long.json: protocol .* differs"):
        run_module.other_evaluations([("random-real", str(a)), ("delt", str(b))])
