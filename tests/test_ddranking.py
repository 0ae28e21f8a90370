"""delt.ddranking: DD-Ranking's scores (both unit conventions) and `delt ddranking`."""

import json
import math
import shutil

import pytest
from delt.config import ConfigError
from delt.ddranking import (
    DDRankingConfig,
    augmentation_robust_score,
    label_robust_score,
    normalized_score,
    run_ddranking,
)

# Hand-computed: e = 2.718282, e^-1 = 0.367879, e - e^-1 = 2.350402.


def test_normalized_score_maps_minus_one_to_one_onto_zero_to_one():
    assert normalized_score(-1.0) == pytest.approx(0.0, abs=1e-15)
    assert normalized_score(1.0) == pytest.approx(1.0)
    # (1 - 0.367879) / 2.350402
    assert normalized_score(0.0) == pytest.approx(0.268941, abs=1e-6)


def test_label_robust_score_with_fractions():
    # HLR = 0.90 - 0.30 = 0.60, IOR = 0.60 - 0.55 = 0.05, alpha = 0.025 - 0.30 = -0.275,
    # LRS = (e^-0.275 - e^-1) / (e - e^-1) = (0.759572 - 0.367879) / 2.350402 = 0.166649.
    score = label_robust_score(0.90, 0.30, 0.60, 0.55)
    assert score.hlr == pytest.approx(0.60) and score.ior == pytest.approx(0.05)
    assert score.alpha == pytest.approx(-0.275)
    assert score.lrs == pytest.approx(0.166649, abs=1e-6)
    assert 0.0 <= score.lrs <= 1.0


def test_label_robust_score_in_dd_rankings_percent_convention_saturates():
    # The same accuracies in percent: alpha = -27.5, LRS = (e^-27.5 - e^-1) / 2.350402, with
    # e^-27.5 = 1.1e-12: -0.156518, below 0 (the floor every set with HLR > IOR + a few points
    # reaches).
    score = label_robust_score(90.0, 30.0, 60.0, 55.0, unit="percent")
    assert score.hlr == pytest.approx(60.0) and score.alpha == pytest.approx(-27.5)
    assert score.lrs == pytest.approx(-0.156518, abs=1e-6)
    other = label_robust_score(90.0, 50.0, 60.0, 55.0, unit="percent")  # HLR 40 instead of 60
    # alpha -17.5: e^-17.5 = 2.5e-8, so the two differ by 1e-8: they cannot be told apart.
    assert other.lrs == pytest.approx(score.lrs, abs=1e-7)
    fractions = label_robust_score(0.90, 0.50, 0.60, 0.55)
    assert fractions.lrs > score.lrs + 0.1  # fractions can: alpha -0.175, LRS 0.202


def test_the_weight_moves_alpha():
    score = label_robust_score(0.9, 0.3, 0.6, 0.55, weight=1.0)  # alpha = IOR
    assert score.alpha == pytest.approx(0.05)
    score = label_robust_score(0.9, 0.3, 0.6, 0.55, weight=0.0)  # alpha = -HLR
    assert score.alpha == pytest.approx(-0.60)


def test_augmentation_robust_score_in_both_conventions():
    # beta = 0.5 (0.50 - 0.45) + 0.5 (0.30 - 0.32) = 0.015; (e^0.015 - e^-1) / 2.350402
    beta, ars = augmentation_robust_score(0.50, 0.45, 0.30, 0.32)
    assert beta == pytest.approx(0.015) and ars == pytest.approx(0.275372, abs=1e-6)
    # In percent beta = 1.5: (e^1.5 - e^-1) / 2.350402 = 1.750258, above the [0, 1] range.
    beta, ars = augmentation_robust_score(50.0, 45.0, 30.0, 32.0, unit="percent")
    assert beta == pytest.approx(1.5) and ars == pytest.approx(1.750258, abs=1e-6)


def test_accuracies_outside_the_unit_are_refused():
    with pytest.raises(ValueError, match=r"full_hard must be an accuracy in \[0, 1\], got 90.0"):
        label_robust_score(90.0, 30.0, 60.0, 55.0)
    with pytest.raises(ValueError, match="set_hard must be an accuracy in"):
        label_robust_score(90.0, 130.0, 60.0, 55.0, unit="percent")
    with pytest.raises(ValueError, match="unit must be"):
        label_robust_score(0.9, 0.3, 0.6, 0.55, unit="percents")
    with pytest.raises(ValueError, match="weight must be in"):
        augmentation_robust_score(0.5, 0.4, 0.3, 0.2, weight=2.0)


@pytest.mark.parametrize(
    "overrides, message",
    [({"lr_grid": ("0.1", "x")}, "--lr-grid takes numbers, got 'x'"),
     ({"lr_grid": ("-1",)}, "--lr-grid takes numbers > 0"),
     ({"weight": 1.5}, "--weight must be in"),
     ({"full_data_accuracy": 0.9e3}, "--full-data-accuracy is a top-1 in percent"),
     ({"seeds": ()}, "--seeds needs at least one seed")],
)  # fmt: skip
def test_bad_ddranking_flags_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        DDRankingConfig(distilled="x", **overrides)


# --------------------------------------------------------------------------------------------
# delt ddranking on the tiny set


@pytest.fixture
def own_set(tiny_set, tmp_path):
    """A copy of the tiny set: delt ddranking writes its files beside it."""
    folder = tmp_path / "set"
    shutil.copytree(tiny_set, folder, ignore=shutil.ignore_patterns("eval*", "chunks", ".lock"))
    return folder


def test_ddranking_runs_every_accuracy_and_scores_them(own_set, monkeypatch):
    tiny_set = own_set
    config = DDRankingConfig(
        distilled=str(tiny_set), seeds=(0, 1), epochs=1, lr_grid=("0.001", "0.01"),
        full_data_epochs=1, progress=False,
    )  # fmt: skip
    result = run_ddranking(config)
    document = json.loads((tiny_set / "ddranking.json").read_text())
    assert result.path == tiny_set / "ddranking.json"
    files = document["evaluations"]
    assert set(files) == {
        "set_hard", "set_soft", "random_soft", "set_soft_noaug", "random_soft_noaug"
    }  # fmt: skip
    assert all(set(lrs) == {"0.001", "0.01"} for lrs in files.values())
    for name in ("set_soft_noaug", "random_soft_noaug"):
        for path in files[name].values():
            evaluation = json.loads(open(path).read())
            assert evaluation["identity"]["config"]["augment"] is False
            assert evaluation["method"] == ("random-real" if name.startswith("random") else "cda")
    for path in files["set_soft"].values():  # the with-augmentation runs are LRS's own
        assert "augment" not in json.loads(open(path).read())["identity"]["config"]
    hard = {lr: json.loads(open(path).read()) for lr, path in files["set_hard"].items()}
    for evaluation in hard.values():
        assert evaluation["identity"]["config"]["protocol"] == "dd-ranking"
        assert evaluation["config"]["hard_labels"] and evaluation["config"]["cutmix_beta"] == 0.0
    random_doc = json.loads(open(files["random_soft"]["0.01"]).read())
    assert random_doc["method"] == "random-real"
    full = document["full_data"]
    assert full["arch"] == "convnet2" and full["epochs"] == 1 and not full["given"]
    recipe = full["recipe"]
    assert (recipe["lr"], recipe["lr_schedule"], recipe["lr_step_epochs"]) == (0.01, "step", 100)
    assert not recipe["nesterov"] and recipe["label_smoothing"] == 0.0
    assert recipe["augment"] == "none" and recipe["test_every"] == 20
    assert full["tests"] == {"1": full["accuracy_percent"]} and full["best_epoch"] == 1
    teacher = json.loads((tiny_set / "ddranking-full-data" / "teacher.json").read_text())
    assert teacher["config"]["lr_schedule"] == "step" and teacher["config"]["decay_all"]
    for run in document["runs"]:
        seed = run["seed"]
        best_hard = max(
            entry["best_accuracy"]
            for evaluation in hard.values()
            for entry in evaluation["seeds"]
            if entry["seed"] == seed
        )
        accuracies = run["accuracy_percent"]
        assert accuracies["set_hard"] == best_hard
        assert accuracies["full_hard"] == full["accuracy_percent"]
        order = ("full_hard", "set_hard", "set_soft", "random_soft")
        expected = label_robust_score(*(accuracies[key] / 100 for key in order))
        assert run["fraction"]["lrs"] == pytest.approx(expected.lrs)
        assert -1 <= run["fraction"]["alpha"] <= 1 and 0 <= run["fraction"]["lrs"] <= 1
        assert run["percent_convention"]["hlr"] == pytest.approx(100 * run["fraction"]["hlr"])
        noaug = {
            name: max(
                entry["best_accuracy"]
                for path in files[name].values()
                for entry in json.loads(open(path).read())["seeds"]
                if entry["seed"] == seed
            )
            for name in ("set_soft_noaug", "random_soft_noaug")
        }
        assert {k: accuracies[k] for k in noaug} == noaug
        order = ("set_soft", "random_soft", "set_soft_noaug", "random_soft_noaug")
        beta, ars = augmentation_robust_score(*(accuracies[key] / 100 for key in order))
        assert run["fraction"]["beta"] == pytest.approx(beta)
        assert run["fraction"]["ars"] == pytest.approx(ars) and 0 <= ars <= 1
        assert run["percent_convention"]["beta"] == pytest.approx(100 * beta)
        assert run["percent_convention"]["ars"] == pytest.approx(
            augmentation_robust_score(*(accuracies[key] for key in order), unit="percent")[1]
        )
    lrs = [run["fraction"]["lrs"] for run in document["runs"]]
    assert result.lrs_mean == pytest.approx(sum(lrs) / 2)
    ars = [run["fraction"]["ars"] for run in document["runs"]]
    assert document["ars_mean"] == pytest.approx(sum(ars) / 2) and not document["not_computed"]

    # A rerun trains nothing: every evaluation and the full-data student are cached.
    import delt.student_trainer as trainer_module

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(trainer_module.StudentTrainer, "train_epoch", no_training)
    again = run_ddranking(config)
    assert again.lrs_mean == result.lrs_mean


def test_ddranking_takes_a_given_full_data_accuracy(own_set):
    config = DDRankingConfig(
        distilled=str(own_set), seeds=(0,), epochs=1, lr_grid=("0.001",), soft_lr=0.001,
        full_data_accuracy=100.0, ars=False, progress=False,
    )  # fmt: skip
    result = run_ddranking(config)
    assert result.document["ars_mean"] is None and result.document["not_computed"]
    assert "set_soft_noaug" not in result.document["evaluations"]
    run = result.document["runs"][0]
    assert result.document["full_data"] == {"accuracy_percent": 100.0, "given": True}
    assert run["fraction"]["hlr"] == pytest.approx(1 - run["accuracy_percent"]["set_hard"] / 100)
    assert set(result.document["evaluations"]["set_soft"]) == {"0.001"}
    assert not math.isnan(result.lrs_mean)


def test_the_cli_parses_ddranking_flags():
    from delt.cli import build_parser
    from delt.config import from_namespace

    flags = ["--distilled", "x", "--lr-grid", "0.001,0.01", "--soft-lr", "0.002", "--seeds", "3"]
    config = from_namespace(DDRankingConfig, build_parser().parse_args(["ddranking", *flags]))
    assert config.grid == (0.001, 0.01) and config.soft_lr == 0.002 and config.seeds == (3,)
    config = DDRankingConfig(distilled="x", soft_lr=None)
    assert config.eval_config("set-hard", 0.005).cutmix_beta == 0.0  # dd-ranking's hard runs
    soft = config.eval_config("set-soft", 0.005)
    assert (soft.protocol, soft.lr, soft.batch_size, soft.out) == (
        "dd-ranking",
        0.005,
        1024,
        "x/eval-ddranking-set-soft-lr0.005.json",
    )


def test_ddranking_under_torchrun_needs_the_full_data_accuracy(monkeypatch):
    import types

    import delt.ddranking as ddranking_module

    monkeypatch.setattr(ddranking_module, "world", lambda: types.SimpleNamespace(size=2, rank=0))
    with pytest.raises(ConfigError, match="under torchrun: measure the full data first"):
        run_ddranking(DDRankingConfig(distilled="x"))
