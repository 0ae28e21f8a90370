"""delt.compare: `delt compare` (sets against random real images paired by seed, per student
budget; starting images; reuse, resume, imported sets, refusals)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import count_calls
from delt.cli import main
from delt.compare import EVAL_FLAGS, CompareConfig, run_compare, sign_flip_p
from delt.comparison import RunRecord, compare
from delt.config import ConfigError
from delt.data import load_like
from delt.distilled_set import Manifest, load_distilled, save_distilled
from delt.evaluate import EvalConfig, draw_random_real, evaluate
from delt.import_released import ImportConfig, import_images
from delt.models import load_checkpoint
from delt.select import Selection
from delt.student_trainer import StudentTrainer
from imagefolders import write_images


def _config(sets, out, **overrides):
    values = dict(sets=tuple(str(s) for s in sets), out=str(out), seeds=(0, 1), epochs=(2,),
                  eval_every=1, progress=False, device="cpu")  # fmt: skip
    values.update(overrides)
    return CompareConfig(**values)


@pytest.fixture(scope="module")
def tiny_set(tiny_set, tmp_path_factory):
    """The session's CDA set, copied without what other tests wrote beside it: an eval.json
    there of the same evaluation would be reused, and the tests here would depend on order."""
    out = tmp_path_factory.mktemp("cda-copy") / "cda"
    out.mkdir()
    for name in ("distilled.pt", "manifest.json"):
        shutil.copy2(tiny_set / name, out / name)
    return out


@pytest.fixture(scope="module")
def delt_set(tiny_teacher, tiny_selection, tmp_path_factory):
    """A DELT recovery of IPC 2 from the tiny selection (real starting images)."""
    from delt.recover import RecoverConfig, recover

    out = tmp_path_factory.mktemp("delt")
    recover(
        RecoverConfig(
            teacher=str(tiny_teacher.path), ipc=2, out=str(out), method="delt", iterations=4,
            round_iterations=2, selection=str(tiny_selection), progress=False,
        )
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def compared(tiny_set, delt_set, tmp_path_factory):
    """`delt compare --sets CDA DELT --random-real --initial --seeds 0,1 --epochs 1,2`."""
    out = tmp_path_factory.mktemp("compare")
    config = _config((tiny_set, delt_set), out, epochs=(1, 2), random_real=True, initial=True)
    return config, run_compare(config)


def _eval(path):
    return json.loads(Path(path).read_text())


def test_sign_flip_p_is_exact():
    # Three positive gains: only all-positive and all-negative are as extreme: 2/8.
    assert sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    # Mixed signs: |sum| = 2; assignments with |sum| >= 2 of (+-1, +-3): all four.
    assert sign_flip_p([1.0, -3.0]) == 1.0
    assert sign_flip_p([0.5]) is None
    assert sign_flip_p([1.0, 1.0, 1.0, 1.0, 1.0]) == pytest.approx(2 / 32)


def test_eval_flags_are_forwarded_generically():
    # Every delt eval flag except those compare sets per evaluation is a compare flag.
    assert {"student", "batch_size", "amp", "shuffle_patches", "eval_every"} <= set(EVAL_FLAGS)
    assert not {"distilled", "epochs", "seeds", "random_real", "ipc", "out"} & set(EVAL_FLAGS)
    config = CompareConfig(sets=("a",), epochs=(5,), temperature=4.0, min_crop=0.5)
    forwarded = config.eval_config("a", 5, Path("r.json"))
    assert (forwarded.temperature, forwarded.min_crop, forwarded.epochs) == (4.0, 0.5, 5)
    with pytest.raises(ConfigError, match="--min-crop"):
        CompareConfig(sets=("a",), min_crop=2.0)
    with pytest.raises(ConfigError, match="--epochs lists a budget twice"):
        CompareConfig(sets=("a",), epochs=(3, 3))


def test_pairs_seed_by_seed_with_delt_eval_random_real(compared, tiny_teacher, tmp_path):
    config, result = compared
    document = result.document
    for budget in document["budgets"]:
        evaluations = {e["label"]: e for e in budget["evaluations"]}
        baseline = evaluations["random-real"]
        # The draws are delt eval --random-real's, seed by seed.
        saved = _eval(baseline["eval"])
        train = load_like(load_checkpoint(tiny_teacher.path).info, "train")
        for seed in saved["seeds"]:
            _, _, indices = draw_random_real(train, 2, seed["seed"])
            assert seed["indices"] == indices.tolist()
        assert saved["config"]["epochs"] == budget["epochs"]
        # Every gain is the set's accuracy minus random real's of the same seed, in its files.
        gains = {gain["method"]: gain for gain in budget["gains"]}
        for label in (Path(config.sets[0]).name, Path(config.sets[1]).name):
            accuracies = {
                s["seed"]: s["best_accuracy"] for s in _eval(evaluations[label]["eval"])["seeds"]
            }
            baseline_by_seed = {s["seed"]: s["best_accuracy"] for s in saved["seeds"]}
            expected = {seed: accuracies[seed] - baseline_by_seed[seed] for seed in (0, 1)}
            assert gains[label]["gains"] == pytest.approx(expected)
            assert gains[label]["p_sign_flip"] == sign_flip_p(list(expected.values()))
    # The same evaluation as `delt eval --random-real` run by hand (identical students).
    by_hand = evaluate(
        EvalConfig(distilled=str(tmp_path / "rr"), teacher=str(tiny_teacher.path),
                   random_real=True, ipc=2, seeds=(0, 1), epochs=2, eval_every=1,
                   progress=False, device="cpu")
    )  # fmt: skip
    two = next(b for b in document["budgets"] if b["epochs"] == 2)
    mine = _eval(next(e for e in two["evaluations"] if e["kind"] == "baseline")["eval"])
    assert [s["curve"] for s in mine["seeds"]] == [s.curve for s in by_hand.seeds]


def test_budgets_are_separate_schedules(compared):
    config, result = compared
    budgets = result.document["budgets"]
    assert [b["epochs"] for b in budgets] == [1, 2]
    for budget in budgets:
        for evaluation in budget["evaluations"]:
            saved = _eval(evaluation["eval"])
            assert saved["config"]["epochs"] == budget["epochs"] and saved["complete"]
            assert len(saved["seeds"][0]["curve"]) == budget["epochs"]
    files = {e["eval"] for b in budgets for e in b["evaluations"]}
    assert len(files) == 2 * 4  # two sets, random real and DELT's starting images, per budget
    markdown = (Path(config.out) / "compare.md").read_text()
    assert "## 1 student epochs" in markdown and "## 2 student epochs" in markdown
    assert "Evaluation: `--protocol delt` with `--eval-every 1`" in markdown
    assert (Path(config.out) / "compare.png").stat().st_size > 0


def test_gains_are_comparison_pooling_over_the_same_eval_files(compared):
    """benchmarks/quality's pooling (delt.comparison.compare over one run per set and seed)
    over the eval.json files compare.json names gives compare's rows and gains."""
    config, result = compared
    for budget in result.document["budgets"]:
        runs = []
        for evaluation in budget["evaluations"]:
            saved = _eval(evaluation["eval"])
            row = next(r for r in budget["rows"] if r["method"] == evaluation["label"])
            for seed in saved["seeds"]:
                report = {"method": evaluation["label"], "dataset": saved["dataset"],
                          "ipc": saved["ipc"], "accuracy_mean": seed["best_accuracy"],
                          "accuracy_std": 0.0, "diversity": row["diversity"],
                          "synthesis_seconds": row["synthesis_seconds"],
                          "image_iterations": row["image_iterations"]}  # fmt: skip
                runs.append(RunRecord(evaluation["label"], seed["seed"], report))
        pooled = compare(runs)
        assert pooled.rows == budget["rows"]
        assert [g.to_dict() for g in pooled.gains] == [
            {k: v for k, v in g.items() if k != "p_sign_flip"} for g in budget["gains"]
        ]


def test_initial_images_are_the_selection_picks(compared, delt_set, tiny_selection, tiny_teacher):
    config, result = compared
    sets = {entry["label"]: entry for entry in result.document["sets"]}
    cda, delt = sets[Path(config.sets[0]).name], sets[delt_set.name]
    assert "records no starting images" in cda["initial"]["missing"]
    images, labels, manifest = load_distilled(delt["initial"]["folder"])
    selection = Selection.load(tiny_selection)
    train = load_like(load_checkpoint(tiny_teacher.path).info, "train")
    picks = [selection.indices[c][j] for c in range(4) for j in range(2)]
    assert torch.equal(images, train.images(picks)) and manifest.image_iterations == 0
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for budget in result.document["budgets"]:
        (added,) = budget["synthesis_gains"]
        assert added["method"] == delt_set.name and added["over"] == f"{delt_set.name} (initial)"
    assert "No starting images to compare with" in result.markdown


def test_rerun_trains_nothing_and_resumes_after_a_kill(
    tiny_set, delt_set, compared, tmp_path, monkeypatch
):
    config, result = compared
    calls = count_calls(monkeypatch, StudentTrainer, "train_epoch")
    again = run_compare(config)
    assert calls == [] and again.document["budgets"] == result.document["budgets"]
    # A run killed in its third student epoch; the rerun trains only what was left, and ends
    # with the numbers of the uninterrupted run.
    fresh = _config((tiny_set, delt_set), tmp_path / "killed", epochs=(1, 2), random_real=True,
                    initial=True, checkpoint_every=1)  # fmt: skip
    count_calls(monkeypatch, StudentTrainer, "train_epoch", die_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_compare(fresh)
    calls = count_calls(monkeypatch, StudentTrainer, "train_epoch")
    resumed = run_compare(fresh)
    total = 2 * 4 * (1 + 2)  # seeds x evaluations x (1 + 2 epochs)
    assert len(calls) == total - 2
    for mine, theirs in zip(resumed.document["budgets"], result.document["budgets"], strict=True):
        assert mine["rows"] == theirs["rows"] and mine["gains"] == theirs["gains"]


def test_an_imported_released_set_is_compared(tiny_teacher, tiny_set, tmp_path, capsys):
    released = tmp_path / "released"
    for c in range(4):
        write_images(released / f"new{c:03d}", 2, 8, seed=c, suffix="png")
    import_images(ImportConfig(images=str(released), teacher=str(tiny_teacher.path),
                               out=str(tmp_path / "imported")))  # fmt: skip
    out = tmp_path / "cmp"
    status = main(["compare", "--sets", str(tmp_path / "imported"), str(tiny_set), "--out",
                   str(out), "--random-real", "--initial", "--seeds", "0", "--epochs", "1",
                   "--eval-every", "1", "--no-progress", "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0
    document = json.loads((out / "compare.json").read_text())
    (budget,) = document["budgets"]
    assert {g["method"] for g in budget["gains"]} == {"imported", tiny_set.name}
    assert document["sets"][0]["method"] == "imported"
    assert "records no starting images" in document["sets"][0]["initial"]["missing"]
    # Every printed evaluation names its file.
    for evaluation in budget["evaluations"]:
        assert evaluation["eval"] in printed


def _set_like(source, out, ipc):
    """A copy of the set ``source`` with ``ipc`` images per class (random images)."""
    _, _, manifest = load_distilled(source)
    count = ipc * manifest.dataset.num_classes
    images = torch.randn(count, 3, 8, 8)
    labels = torch.arange(manifest.dataset.num_classes).repeat_interleave(ipc)
    manifest.ipc, manifest.num_images = ipc, count
    manifest.iterations_per_image = [0] * count
    manifest.distilled_sha256 = None
    save_distilled(out, images, labels, manifest)
    return out


def _refused(args, capsys, monkeypatch):
    calls = count_calls(monkeypatch, StudentTrainer, "train_epoch")
    status = main(["compare", *args, "--seeds", "0", "--epochs", "1", "--no-progress"])
    assert status == 2 and calls == []
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("delt compare: error: ")
    return error


def test_refusals_before_any_training(
    tiny_set, three_class_teacher, tiny_teacher, tmp_path, capsys, monkeypatch
):
    from delt.recover import RecoverConfig, recover

    other = tmp_path / "other-data"
    recover(RecoverConfig(teacher=str(three_class_teacher.path), ipc=2, out=str(other),
                          method="sre2l", iterations=2, progress=False))  # fmt: skip
    error = _refused(
        ["--sets", str(tiny_set), str(other), "--out", str(tmp_path / "o")], capsys, monkeypatch
    )
    assert f"--sets {other}" in error and "classes" in error
    # Another teacher of the same data: its soft labels differ.
    other_teacher = tmp_path / "teacher.pt"
    checkpoint = torch.load(tiny_teacher.path, weights_only=True)
    checkpoint["meta"] = {**checkpoint["meta"], "note": "another teacher"}
    torch.save(checkpoint, other_teacher)
    relabelled = tmp_path / "relabelled"
    manifest = Manifest.load(tiny_set)
    images, labels, _ = load_distilled(tiny_set)
    manifest.teacher = {**manifest.teacher, "path": str(other_teacher), "sha256": "0" * 64}
    manifest.distilled_sha256 = None
    save_distilled(relabelled, images + 0.5, labels, manifest)
    error = _refused(["--sets", str(tiny_set), str(relabelled), "--out", str(tmp_path / "o")],
                     capsys, monkeypatch)  # fmt: skip
    assert f"--sets {relabelled}: made with teacher" in error and "--teacher" in error
    # Other IPCs, when paired with random real images.
    bigger = _set_like(tiny_set, tmp_path / "ipc3", 3)
    error = _refused(["--sets", str(tiny_set), str(bigger), "--out", str(tmp_path / "o"),
                      "--random-real"], capsys, monkeypatch)  # fmt: skip
    assert f"--sets {bigger}: IPC 3" in error
    # No random real images of the set's IPC: the training split has too few per class.
    huge = _set_like(tiny_set, tmp_path / "ipc40", 40)
    error = _refused(
        ["--sets", str(huge), "--out", str(tmp_path / "o"), "--random-real"], capsys, monkeypatch
    )
    assert "--random-real" in error and "IPC 40" in error
    # The same set twice; a folder that is no set.
    error = _refused(
        ["--sets", str(tiny_set), str(tiny_set), "--out", str(tmp_path / "o")], capsys, monkeypatch
    )
    assert "twice" in error
    error = _refused(["--sets", str(tmp_path), "--out", str(tmp_path / "o")], capsys, monkeypatch)
    assert f"--sets {tmp_path}: no distilled set" in error


def test_a_sets_own_finished_evaluation_is_used_where_it_is(tiny_set, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "cda"
    shutil.copytree(tiny_set, folder, ignore=shutil.ignore_patterns("eval*", "diversity*"))
    own = evaluate(EvalConfig(distilled=str(folder), epochs=2, seeds=(0, 1), eval_every=1,
                              progress=False, device="cpu"))  # fmt: skip
    before = (folder / "eval.json").read_bytes()
    calls = count_calls(monkeypatch, StudentTrainer, "train_epoch")
    result = run_compare(_config((folder,), tmp_path / "out"))
    assert calls == [] and (folder / "eval.json").read_bytes() == before
    (evaluation,) = result.document["budgets"][0]["evaluations"]
    assert evaluation["eval"] == str(folder / "eval.json")
    assert evaluation["mean"] == own.accuracy_mean
    # Other seeds (or flags) than the file's: evaluated under OUT, the set's file untouched.
    result = run_compare(_config((folder,), tmp_path / "out", seeds=(1,)))
    (evaluation,) = result.document["budgets"][0]["evaluations"]
    assert Path(evaluation["eval"]).is_relative_to(tmp_path / "out") and len(calls) == 2
    assert (folder / "eval.json").read_bytes() == before


@pytest.mark.slow
def test_under_torchrun_two_ranks_give_one_comparison(tiny_set, tmp_path):
    # Two Gloo ranks train every student together (delt eval's DDP); rank 0 writes the files.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", DELT_DIST_TIMEOUT="60", PYTHONSAFEPATH="1")
    out = tmp_path / "two"
    delt = ["-m", "delt", "compare", "--sets", str(tiny_set), "--out", str(out), "--random-real",
            "--seeds", "0,1", "--epochs", "1", "--eval-every", "1", "--batch-size", "4",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run(
        [*launcher, *delt], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("compare: ") == 1  # rank 0 prints
    document = json.loads((out / "compare.json").read_text())
    (budget,) = document["budgets"]
    (gain,) = budget["gains"]
    evaluations = {e["label"]: e for e in budget["evaluations"]}
    for seed in (0, 1):
        accuracy = evaluations[tiny_set.name]["accuracies"][str(seed)]
        baseline = evaluations["random-real"]["accuracies"][str(seed)]
        assert gain["gains"][str(seed)] == pytest.approx(accuracy - baseline)
    # Rerun as one process: every seed is reused, nothing trains.
    again = subprocess.run(
        [sys.executable, *delt], env=env, capture_output=True, text=True, timeout=240
    )
    assert again.returncode == 0 and "(cached)" in again.stderr


def test_a_random_real_set_of_seed_0_has_gain_0_at_seed_0(tiny_teacher, tmp_path):
    # delt distill --method random-real --seed 0 draws what delt eval --random-real draws for
    # seed 0: the same images, the same students, a gain of exactly 0 there and only there.
    from delt.methods.random_real import RANDOM_REAL

    RANDOM_REAL.draw_set(str(tiny_teacher.path), 2, 0, None, tmp_path / "drawn")
    result = run_compare(_config((tmp_path / "drawn",), tmp_path / "out", random_real=True))
    budget = result.document["budgets"][0]
    curves = {
        e["kind"]: [s["train_loss"] for s in _eval(e["eval"])["seeds"]]
        for e in budget["evaluations"]
    }
    assert curves["set"][0] == curves["baseline"][0]
    assert curves["set"][1] != curves["baseline"][1]
    (gain,) = budget["gains"]
    assert gain["gains"][0] == 0.0
