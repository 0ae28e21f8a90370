"""benchmarks/quality/run.py's method names: a method, or one that optimizes pixels with its own
recovery step size (``delt-lr0.05``)."""

import importlib.util
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
