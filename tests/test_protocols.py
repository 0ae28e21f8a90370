"""delt.protocols: `delt eval --protocol NAME` (presets, overrides, identity, eval.json)."""

import json
import logging
import math

import pytest
from delt.cli import build_parser, main
from delt.config import ConfigError, from_namespace
from delt.evaluate import EvalConfig, evaluate
from delt.protocols import PROTOCOLS, SETTINGS, Protocol, protocol_record
from delt.student_trainer import LR_SCHEDULES, cosine_factor, half_cosine_factor, lr_factor

# The settings each preset resolves to, written out (not read back from the table).
EXPECTED = {
    # delt: the flag defaults of delt eval before protocols existed.
    "delt": dict(epochs=300, eval_every=10, batch_size=None, temperature=20.0, lr=1e-3,
                 weight_decay=0.01, cutmix_beta=1.0, randaugment_ops=2, randaugment_magnitude=6,
                 min_crop=0.25, shuffle_patches=None, lr_schedule="half-cosine", ema_decay=0.0,
                 loss="kl", ce_weight=0.025, teacher_batch_stats=False),
    "rded": dict(epochs=300, eval_every=10, batch_size=None, temperature=20.0, lr=1e-3,
                 weight_decay=0.01, cutmix_beta=1.0, randaugment_ops=0, randaugment_magnitude=6,
                 min_crop=0.5, shuffle_patches=2, lr_schedule="half-cosine", ema_decay=0.0,
                 loss="kl", ce_weight=0.025, teacher_batch_stats=False),
    "sre2l": dict(epochs=300, eval_every=10, batch_size=1024, temperature=20.0, lr=1e-3,
                  weight_decay=0.01, cutmix_beta=1.0, randaugment_ops=0, randaugment_magnitude=6,
                  min_crop=0.08, shuffle_patches=None, lr_schedule="cosine", ema_decay=0.0,
                 loss="kl", ce_weight=0.025, teacher_batch_stats=False),
    "edc": dict(epochs=300, eval_every=30, batch_size=100, temperature=20.0, lr=1e-3,
                weight_decay=0.01, cutmix_beta=1.0, randaugment_ops=0, randaugment_magnitude=6,
                min_crop=0.5, shuffle_patches=2, lr_schedule="half-cosine", ema_decay=0.99,
                 loss="mse-ce", ce_weight=0.025, teacher_batch_stats=False),
    "cvdd": dict(epochs=300, eval_every=10, batch_size=16, temperature=20.0, lr=1e-3,
                 weight_decay=0.01, cutmix_beta=1.0, randaugment_ops=0, randaugment_magnitude=6,
                 min_crop=0.08, shuffle_patches=None, lr_schedule="half-cosine", ema_decay=0.0,
                 loss="kl", ce_weight=0.025, teacher_batch_stats=True),
    "dd-ranking": dict(epochs=300, eval_every=20, batch_size=1024, temperature=20.0, lr=1e-3,
                       weight_decay=0.01, cutmix_beta=1.0, randaugment_ops=0,
                       randaugment_magnitude=6, min_crop=0.08, shuffle_patches=None,
                       lr_schedule="half-cosine", ema_decay=0.0,
                 loss="kl", ce_weight=0.025, teacher_batch_stats=False),
}  # fmt: skip


def _settings(config):
    return {name: getattr(config, name) for name in SETTINGS}


def test_every_protocol_is_expected_and_documented():
    assert set(PROTOCOLS) == set(EXPECTED)
    for protocol in PROTOCOLS.values():
        assert set(protocol.settings) == set(SETTINGS)
        assert "github.com/" in protocol.source


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_preset_resolves_to_its_settings(name):
    config = EvalConfig(distilled="x", protocol=name)
    assert _settings(config) == EXPECTED[name]


def test_the_default_protocol_is_delt_at_todays_values():
    assert EvalConfig(distilled="x").protocol == "delt"
    assert _settings(EvalConfig(distilled="x")) == EXPECTED["delt"]


def test_explicit_settings_override_the_preset():
    config = EvalConfig(distilled="x", protocol="sre2l", epochs=100, min_crop=0.3, batch_size=64)
    assert (config.epochs, config.min_crop, config.batch_size) == (100, 0.3, 64)
    assert config.lr_schedule == "cosine" and config.randaugment_ops == 0  # the rest: sre2l's
    record = protocol_record(config)
    assert record["name"] == "sre2l" and "VILA-Lab/SRe2L" in record["source"]
    assert record["overrides"] == {"epochs": 300, "min_crop": 0.08, "batch_size": 1024}
    assert record["settings"]["min_crop"] == 0.3
    # A value equal to the preset's is no override.
    same = EvalConfig(distilled="x", protocol="sre2l", epochs=300)
    assert protocol_record(same)["overrides"] == {}


def test_the_cli_resolves_the_protocol_and_keeps_explicit_flags():
    parser = build_parser()
    flags = ["--protocol", "rded", "--lr", "0.002", "--randaugment-ops", "1"]
    args = parser.parse_args(["eval", "--distilled", "x", *flags])
    config = from_namespace(EvalConfig, args)
    assert config.lr == 0.002 and config.randaugment_ops == 1  # given
    assert config.shuffle_patches == 2 and config.min_crop == 0.5  # rded's
    args = parser.parse_args(["eval", "--distilled", "x", "--lr-schedule", "cosine"])
    assert from_namespace(EvalConfig, args).lr_schedule == "cosine"


def test_dd_ranking_hard_label_runs_have_no_cutmix_unless_given():
    hard = EvalConfig(distilled="x", protocol="dd-ranking", hard_labels=True)
    assert hard.cutmix_beta == 0.0 and hard.min_crop == 0.08  # use_aug_for_hard: false
    assert EvalConfig(distilled="x", protocol="dd-ranking").cutmix_beta == 1.0
    given = EvalConfig(distilled="x", protocol="dd-ranking", hard_labels=True, cutmix_beta=0.5)
    assert given.cutmix_beta == 0.5


def test_an_unknown_protocol_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--protocol must be one of delt, rded, sre2l"):
        EvalConfig(distilled="x", protocol="fkd")
    with pytest.raises(ConfigError, match="--lr-schedule must be one of half-cosine, cosine"):
        EvalConfig(distilled="x", lr_schedule="step")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--distilled", str(tmp_path), "--protocol", "fkd"])
    assert exit_info.value.code == 2
    assert "--protocol" in capsys.readouterr().err


def test_lr_schedules():
    assert set(LR_SCHEDULES) == {"half-cosine", "cosine"}
    assert cosine_factor(0, 10) == 1.0 and cosine_factor(10, 10) == pytest.approx(0.0, abs=1e-15)
    assert cosine_factor(5, 10) == pytest.approx(0.5)
    assert half_cosine_factor(10, 10) == pytest.approx(0.5)
    assert lr_factor("half-cosine", 3, 7) == half_cosine_factor(3, 7)
    assert lr_factor("cosine", 3, 7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 7)))


# --------------------------------------------------------------------------------------------
# Runs: eval.json, identity, warnings


def _eval(folder, out, **overrides):
    values = dict(
        distilled=str(folder), epochs=2, seeds=(0,), eval_every=1, progress=False, out=str(out)
    )
    values.update(overrides)
    return evaluate(EvalConfig(**values))


def test_the_delt_protocol_adds_nothing_to_the_identity(tiny_set, tmp_path):
    _eval(tiny_set, tmp_path / "delt.json")
    document = json.loads((tmp_path / "delt.json").read_text())
    identity = document["identity"]["config"]
    trimmed = {"protocol", "lr_schedule", "ema_decay", "loss", "ce_weight", "teacher_batch_stats"}
    assert not trimmed & set(identity)
    assert document["protocol"]["name"] == "delt" and document["protocol"]["overrides"] == {
        "epochs": 300,
        "eval_every": 10,
    }
    assert document["config"]["lr_schedule"] == "LambdaLR 0.5*(1+cos(pi*e/(2E))) per epoch"


def test_a_protocol_is_recorded_and_part_of_the_identity(tiny_set, tmp_path, caplog):
    plain = _eval(tiny_set, tmp_path / "plain.json")
    with caplog.at_level(logging.WARNING, logger="delt"):
        sre2l = _eval(tiny_set, tmp_path / "sre2l.json", protocol="sre2l")
    assert "--protocol sre2l: not done here: soft labels stored once offline" in caplog.text
    document = json.loads((tmp_path / "sre2l.json").read_text())
    identity = document["identity"]["config"]
    assert identity["protocol"] == "sre2l" and identity["lr_schedule"] == "cosine"
    assert identity["min_crop"] == 0.08 and identity["randaugment_ops"] == 0
    assert document["config"]["batch_size"] == 8  # 1024, capped at the set's 8 images
    assert document["config"]["lr_schedule"] == "LambdaLR 0.5*(1+cos(pi*e/E)) per epoch"
    record = document["protocol"]
    assert record["name"] == "sre2l" and record["not_supported"]
    assert record["settings"]["lr_schedule"] == "cosine"
    assert plain.seeds[0].train_loss != sre2l.seeds[0].train_loss


def test_a_preset_changed_later_is_a_new_identity(tiny_set, tmp_path, monkeypatch):
    path = tmp_path / "rded.json"
    first = _eval(tiny_set, path, protocol="rded")
    assert not first.reused
    assert _eval(tiny_set, path, protocol="rded").reused  # the same preset: reused
    changed = Protocol(**{**PROTOCOLS["rded"].__dict__,
                          "settings": {**PROTOCOLS["rded"].settings, "min_crop": 0.6}})  # fmt: skip
    monkeypatch.setitem(PROTOCOLS, "rded", changed)
    again = _eval(tiny_set, path, protocol="rded")
    assert not again.reused  # trained afresh, the first result kept aside
    assert json.loads(path.read_text())["identity"]["config"]["min_crop"] == 0.6
    assert list((tmp_path / "rded-kept").glob("*.json"))


def test_unsupported_settings_warn_and_edc_tests_the_ema(tiny_set, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="delt"):
        _eval(tiny_set, tmp_path / "edc.json", protocol="edc", epochs=1)
    assert "--protocol edc: not done here: EDC relabels with several teachers" in caplog.text
    assert "EMA" not in caplog.text and "MSE" not in caplog.text  # done: --ema-decay, --loss
    document = json.loads((tmp_path / "edc.json").read_text())
    identity = document["identity"]["config"]
    assert identity["ema_decay"] == 0.99 and identity["shuffle_patches"] == 2
    assert identity["loss"] == "mse-ce" and identity["ce_weight"] == 0.025
    assert document["config"]["loss"] == "MSE(student, teacher logits) + 0.025 CE(own label)"


def _trainer(tiny_teacher, **settings):
    import torch
    from delt.models import build_model, load_checkpoint
    from delt.student_augment import StudentAugment
    from delt.student_trainer import StudentTrainer, TrainSettings

    checkpoint = load_checkpoint(tiny_teacher.path)
    info = checkpoint.info
    torch.manual_seed(0)
    student = build_model("convnet2", info, {"width": 4})
    generator = torch.Generator().manual_seed(0)
    trainer = StudentTrainer(
        student, checkpoint.model, StudentAugment(info, 0, 0, 0.5, generator),
        TrainSettings(batch_size=4, **settings), total_epochs=2, lr=1e-2, weight_decay=0.01,
        device=torch.device("cpu"), generator=generator,
    )  # fmt: skip
    images = info.normalize(torch.rand(4, 3, 8, 8))
    return trainer, images, torch.arange(4), info


def test_the_ema_is_updated_every_step_and_is_what_is_tested(tiny_teacher, monkeypatch):
    import delt.student_trainer as trainer_module
    import torch

    plain, images, labels, info = _trainer(tiny_teacher)
    assert plain.ema is None and "ema" not in plain.state_dict()
    trainer, images, labels, info = _trainer(tiny_teacher, ema_decay=0.5)
    initial = [p.detach().clone() for p in trainer.student.parameters()]
    trainer.train_epoch(images, labels)  # one step (4 images, batch 4)
    current = [p.detach().clone() for p in trainer.student.parameters()]
    for average, start, now in zip(trainer.ema, initial, current, strict=True):
        torch.testing.assert_close(average, 0.5 * start + 0.5 * now)
    tested = []

    def record(model, *args, **kwargs):
        tested.append([p.detach().clone() for p in model.parameters()])
        return 12.5

    monkeypatch.setattr(trainer_module, "evaluate_accuracy", record)
    assert trainer.test(None) == 12.5
    for seen, average in zip(tested[0], trainer.ema, strict=True):
        torch.testing.assert_close(seen, average)  # the EMA was tested
    for now, after in zip(current, trainer.student.parameters(), strict=True):
        assert torch.equal(now, after)  # and the student's own parameters are back
    # A resumed trainer continues with the same EMA.
    state = trainer.state_dict()
    resumed, _, _, _ = _trainer(tiny_teacher, ema_decay=0.5)
    resumed.load_state_dict(state)
    for a, b in zip(resumed.ema, trainer.ema, strict=True):
        assert torch.equal(a, b)


def test_the_cosine_schedule_reaches_zero_in_the_trainer(tiny_teacher):
    trainer, images, labels, _ = _trainer(tiny_teacher, lr_schedule="cosine")
    trainer.train_epoch(images, labels)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)
    trainer.train_epoch(images, labels)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_edcs_loss_is_mse_of_the_logits_plus_weighted_ce(tiny_teacher, monkeypatch):
    import delt.student_trainer as trainer_module
    import torch

    trainer, images, labels, _ = _trainer(tiny_teacher, loss="mse-ce", ce_weight=0.5)
    calls = {}
    mse, cross_entropy = torch.nn.functional.mse_loss, trainer_module.cutmix_cross_entropy

    def spy_mse(student, teacher):
        calls["mse"] = mse(student, teacher)
        return calls["mse"]

    def spy_ce(logits, labels, params, rows):
        calls["ce"] = cross_entropy(logits, labels, params, rows)
        calls["ce_params"] = params
        return calls["ce"]

    def no_kl(*args):
        raise AssertionError("KL used")

    monkeypatch.setattr(torch.nn.functional, "mse_loss", spy_mse)
    monkeypatch.setattr(trainer_module, "cutmix_cross_entropy", spy_ce)
    monkeypatch.setattr(trainer_module, "soft_label_kl", no_kl)
    loss = trainer.train_epoch(images, labels)  # one step
    assert calls["ce_params"] is None  # the own labels, not mixed (EDC's target)
    assert loss == pytest.approx(float((calls["mse"] + 0.5 * calls["ce"]).detach()))


def test_ce_weight_applies_to_mse_ce_only():
    with pytest.raises(ConfigError, match="--ce-weight applies with --loss mse-ce, not --loss kl"):
        EvalConfig(distilled="x", ce_weight=0.1)
    assert EvalConfig(distilled="x", protocol="edc", ce_weight=0.1).ce_weight == 0.1
    # A resolved config rebuilt (torchrun's ranks replace progress) is no error.
    import dataclasses

    resolved = EvalConfig(distilled="x")
    assert dataclasses.replace(resolved, progress=False).ce_weight == 0.025
    with pytest.raises(ConfigError, match="--ce-weight must be a finite number >= 0"):
        EvalConfig(distilled="x", loss="mse-ce", ce_weight=-1.0)


def test_a_bad_ema_decay_is_refused():
    with pytest.raises(ConfigError, match=r"--ema-decay must be in \[0, 1\)"):
        EvalConfig(distilled="x", ema_decay=1.0)


def test_batch_statistics_labels_leave_the_teacher_as_it_was(tiny_teacher):
    import copy

    import torch
    from delt.models import load_checkpoint
    from delt.student_trainer import batch_statistics

    teacher = load_checkpoint(tiny_teacher.path).model.eval()
    before = copy.deepcopy(teacher.state_dict())
    batch = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        evaluated = teacher(batch)
        with batch_statistics(teacher):
            labelled = teacher(batch)
        reference = copy.deepcopy(teacher).train()(batch)  # train mode: the batch's statistics
        with batch_statistics(teacher, enabled=False):
            assert torch.equal(teacher(batch), evaluated)
    torch.testing.assert_close(labelled, reference)
    assert not torch.allclose(labelled, evaluated)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # running statistics untouched


def test_cvdd_labels_with_batch_statistics(tiny_set, tmp_path):
    _eval(tiny_set, tmp_path / "cvdd.json", protocol="cvdd", epochs=1)
    identity = json.loads((tmp_path / "cvdd.json").read_text())["identity"]["config"]
    assert identity["teacher_batch_stats"] is True and identity["batch_size"] == 8


def test_delt_compare_passes_the_protocol_to_every_evaluation(tmp_path):
    from delt.compare import CompareConfig

    config = CompareConfig(sets=("a",), protocol="rded", lr=0.002, out=str(tmp_path))
    evaluation = config.eval_config("a", 100, tmp_path / "x.json")
    assert (evaluation.protocol, evaluation.epochs, evaluation.lr) == ("rded", 100, 0.002)
    assert evaluation.shuffle_patches == 2 and evaluation.min_crop == 0.5


def test_a_protocol_that_does_not_fit_the_data_is_refused_naming_it(
    tiny_set, tmp_path, monkeypatch
):
    # A preset whose patch grid does not divide the set's 8 px: refused before any training,
    # naming the protocol and the set; the same value given as a flag is named as the flag.
    from dataclasses import replace

    rded = PROTOCOLS["rded"]
    monkeypatch.setitem(
        PROTOCOLS, "rded", replace(rded, settings={**rded.settings, "shuffle_patches": 3})
    )
    base = dict(distilled=str(tiny_set), epochs=1, progress=False, out=str(tmp_path / "e.json"))
    with pytest.raises(ConfigError) as refused:
        evaluate(EvalConfig(**base, protocol="rded"))
    assert str(refused.value) == (
        f"--protocol rded does not fit {tiny_set}: its --shuffle-patches 3 must divide the image "
        "resolution 8"
    )
    with pytest.raises(ConfigError) as refused:
        evaluate(EvalConfig(**base, shuffle_patches=3))
    assert str(refused.value) == "--shuffle-patches 3 must divide the image resolution 8"
    assert not (tmp_path / "e.json").exists()
