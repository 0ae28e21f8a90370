"""delt.stagewise: ``delt eval --stagewise`` on a tiny progressive set, bad input."""

import json

import pytest
import torch
from delt.cli import main
from delt.config import ConfigError
from delt.evaluate import EvalConfig, evaluate
from delt.recover import RecoverConfig, recover
from delt.stagewise import evaluate_stagewise
from delt.student_trainer import StudentTrainer

# --------------------------------------------------------------------------------------------
# delt eval --stagewise


@pytest.fixture(scope="module")
def tiny_pdd_set(tiny_teacher, tmp_path_factory):
    """A pdd recovery over CDA: 3 stages of 1 image per class (4 classes of 8x8 images)."""
    out = tmp_path_factory.mktemp("pdd")
    recover(
        RecoverConfig(
            teacher=str(tiny_teacher.path), ipc=3, out=str(out), method="pdd", base="cda",
            stages=3, iterations=2, progress=False,
        )
    )  # fmt: skip
    return out


def _config(folder, **overrides):
    values = dict(
        distilled=str(folder), epochs=3, seeds=(0,), eval_every=2, stagewise=True, progress=False
    )
    values.update(overrides)
    return EvalConfig(**values)


def test_eval_stagewise_reports_both_evaluations(tiny_pdd_set, monkeypatch):
    result = evaluate_stagewise(_config(tiny_pdd_set, seeds=(0, 1)))
    assert result.path == tiny_pdd_set / "eval-stagewise.json"
    document = json.loads(result.path.read_text())
    assert document["format"] == "delt-eval-stagewise-v1" and document["complete"]
    assert document["method"] == "pdd" and document["stagewise"]["schedule"] == "restart"
    plan = document["stagewise"]["plan"]
    assert [(s["union_size"], s["epochs"]) for s in plan] == [(4, 1), (8, 1), (12, 1)]
    for entry in document["seeds"]:
        assert [stage["union_size"] for stage in entry["stages"]] == [4, 8, 12]
        assert entry["stages"][-1]["accuracy"] == entry["final_accuracy"]
    assert [s["seed"] for s in document["plain"]["seeds"]] == [0, 1]
    assert document["plain"]["best"]["mean"] is not None
    assert result.accuracy_mean == document["best"]["mean"]
    # A re-run trains nothing; plain eval.json is another file with its own identity.
    import delt.stagewise as stagewise_module

    def fails(*args, **kwargs):
        raise AssertionError("retrained a finished seed")

    monkeypatch.setattr(stagewise_module, "_run_stagewise_seed", fails)
    assert evaluate_stagewise(_config(tiny_pdd_set, seeds=(1, 0))).reused
    plain = evaluate(_config(tiny_pdd_set, stagewise=False))
    assert plain.path == tiny_pdd_set / "eval.json"
    assert "stagewise" not in plain.document["identity"]["config"]


def test_stagewise_student_starts_like_the_plain_one(tiny_pdd_set, tmp_path, monkeypatch):
    # One stage-wise and one plain student per seed, from the same initial weights.
    from delt.evaluate import EvalContext

    initial = []
    original = EvalContext.make_trainer

    def spy(self, seed, total_epochs=None):
        trainer = original(self, seed, total_epochs)
        initial.append({k: v.clone() for k, v in trainer.student.state_dict().items()})
        return trainer

    monkeypatch.setattr(EvalContext, "make_trainer", spy)
    evaluate_stagewise(
        _config(tiny_pdd_set, out=str(tmp_path / "e.json"), stage_schedule="continue")
    )
    assert len(initial) == 2
    assert all(torch.equal(initial[0][k], initial[1][k]) for k in initial[0])


def test_stagewise_needs_a_pdd_set(tiny_teacher, tmp_path):
    recover(
        RecoverConfig(
            teacher=str(tiny_teacher.path), ipc=2, out=str(tmp_path), method="cda",
            iterations=2, progress=False,
        )
    )  # fmt: skip
    with pytest.raises(ConfigError, match="--stagewise: .*--method cda, not pdd"):
        evaluate_stagewise(_config(tmp_path))


@pytest.mark.parametrize(
    "overrides, message",
    [({"random_real": True}, "--stagewise trains on the stages of a pdd set"),
     ({"stagewise": False, "stage_schedule": "continue"}, "--stage-schedule applies with")],
)  # fmt: skip
def test_bad_stagewise_configs(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **overrides)


def test_stagewise_through_the_cli(tiny_pdd_set, tmp_path, capsys):
    argv = f"eval --distilled {tiny_pdd_set} --stagewise --epochs 3 --eval-every 3"
    argv += f" --out {tmp_path / 'cli.json'} --no-progress"
    assert main(argv.split()) == 0
    out = capsys.readouterr().out
    assert "eval: stage-wise best top-1" in out and "eval: plain (the final set" in out


def test_too_few_epochs_for_the_stages_names_the_flags(tiny_pdd_set, tmp_path, capsys):
    message = "--epochs 2 with --stagewise: needs at least one epoch per stage (3 stages)"
    with pytest.raises(ConfigError) as error:
        evaluate_stagewise(_config(tiny_pdd_set, epochs=2, out=str(tmp_path / "e.json")))
    assert str(error.value) == message
    argv = f"eval --distilled {tiny_pdd_set} --stagewise --epochs 2 --out {tmp_path / 'e.json'}"
    assert main([*argv.split(), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"delt eval: error: {message}"
    assert not (tmp_path / "e.json").exists()


def test_stagewise_with_fewer_seeds_keeps_the_cached_ones(tiny_pdd_set, tmp_path, monkeypatch):
    import delt.stagewise as stagewise_module
    from delt.evaluate import EvalContext

    out = str(tmp_path / "e.json")
    both = evaluate_stagewise(_config(tiny_pdd_set, out=out, seeds=(0, 1)))

    def fails(*args, **kwargs):
        raise AssertionError("retrained a finished seed")

    monkeypatch.setattr(stagewise_module, "_run_stagewise_seed", fails)
    monkeypatch.setattr(EvalContext, "run_seed", fails)
    one = evaluate_stagewise(_config(tiny_pdd_set, out=out, seeds=(1,)))
    assert one.reused and one.accuracy_mean == both.seeds[1].best_accuracy
    document = json.loads((tmp_path / "e.json").read_text())
    assert [s["seed"] for s in document["seeds"]] == [1]
    assert [s["seed"] for s in document["other_seeds"]] == [0]
    assert [s["seed"] for s in document["plain"]["seeds"]] == [1]
    assert [s["seed"] for s in document["plain"]["other_seeds"]] == [0]
    assert document["other_seeds"][0]["stages"] == both.document["seeds"][0]["stages"]
    again = evaluate_stagewise(_config(tiny_pdd_set, out=out, seeds=(0, 1)))
    assert again.reused and again.accuracy_mean == both.accuracy_mean
    assert again.document["plain"] == both.document["plain"]


def test_pdd_hard_init_student_trains_on_exactly_the_earlier_unions(
    tiny_teacher, tmp_path, monkeypatch
):
    # --stage-init hard: before stage k, a student trains on U_1 ... U_{k-1} (pdd.py); record
    # every epoch it trains and the images of that epoch.
    from delt.distilled_set import load_stage_unions

    epochs = []
    original = StudentTrainer.train_epoch

    def spy(self, images, labels):
        epochs.append((images.clone(), labels.clone()))
        return original(self, images, labels)

    monkeypatch.setattr(StudentTrainer, "train_epoch", spy)
    out = tmp_path / "hard"
    recover(
        RecoverConfig(
            teacher=str(tiny_teacher.path), ipc=3, out=str(out), method="pdd", base="cda",
            stages=3, iterations=2, stage_init="hard", hard_student_epochs=2, progress=False,
        )
    )  # fmt: skip
    unions = load_stage_unions(out)  # the final U_1, U_2, U_3 (earlier stages are frozen)
    # Stage 2's student: 2 epochs on U_1; stage 3's: 1 epoch on U_1, then 1 on U_2. Never U_3.
    expected = [unions[0], unions[0], unions[0], unions[1]]
    assert len(epochs) == len(expected)
    for (images, labels), (union_images, union_labels) in zip(epochs, expected, strict=True):
        assert torch.equal(images, union_images) and torch.equal(labels, union_labels)


def test_stagewise_results_of_another_test_split_are_not_reused(
    tiny_pdd_set, tmp_path, monkeypatch
):
    import delt.evaluate as evaluate_module
    from delt.data import TensorImageDataset

    out = str(tmp_path / "e.json")
    first = evaluate_stagewise(_config(tiny_pdd_set, out=out))
    real_load_like = evaluate_module.load_like

    def other_test_split(info, split="train", root=None):
        dataset = real_load_like(info, split, root)
        if split != "test":
            return dataset
        return TensorImageDataset(dataset.info, 255 - dataset.pixels, dataset.targets)

    monkeypatch.setattr(evaluate_module, "load_like", other_test_split)
    other = evaluate_stagewise(_config(tiny_pdd_set, out=out))
    assert not other.reused
    assert (
        other.document["identity"]["data_fingerprints"]["test"]
        != (first.document["identity"]["data_fingerprints"]["test"])
    )
    # The first split's results were kept aside, not replaced.
    (kept,) = (tmp_path / "e-kept").iterdir()
    assert json.loads(kept.read_text()) == first.document
