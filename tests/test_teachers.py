"""delt.teachers: several teachers in synthesis (``delt recover --teachers``, policies and
weights) and ensemble soft labels (``delt eval --teachers``, ``delt relabel --teachers``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SYNTHETIC, count_calls
from delt import synthesis as synthesis_module
from delt.cli import main
from delt.data import DatasetInfo
from delt.evaluate import EvalConfig, evaluate
from delt.models import build_model, load_checkpoint, save_checkpoint
from delt.recover import RecoverConfig, recover
from delt.schedules import Chunk
from delt.teachers import (
    EnsembleForward,
    EnsembleLogits,
    EnsembleTarget,
    active_teachers,
    equalized_mean,
    teacher_pairs,
    teacher_weights,
)
from torch import nn

import delt_ext

# --------------------------------------------------------------------------------------------
# Policies and weights, without a model


def test_all_uses_every_teacher_at_every_step():
    assert [active_teachers("all", 3, t, 0) for t in range(3)] == [(0, 1, 2)] * 3


def test_round_robin_takes_one_teacher_per_step_in_turn():
    # FADRM+ (recover/recover.py): models[counter % n], the counter restarting per batch.
    assert [active_teachers("round-robin", 3, t, 7) for t in range(7)] == [
        (0,), (1,), (2,), (0,), (1,), (2,), (0,)
    ]  # fmt: skip


def test_pair_is_cv_dds_sequence_by_ipc_index():
    # CV-DD's model_choice_sequence (recover/recover.py, --model-setting 5) over its five
    # models R18, R50, ShuffleNetV2, MobileNetV2, DenseNet-121: every pair in order.
    names = ["ResNet18", "ResNet50", "ShuffleNetV2", "MobileNetV2", "Densenet121"]
    cv_dd = [
        ["ResNet18", "ResNet50"], ["ResNet18", "ShuffleNetV2"], ["ResNet18", "MobileNetV2"],
        ["ResNet18", "Densenet121"], ["ResNet50", "ShuffleNetV2"], ["ResNet50", "MobileNetV2"],
        ["ResNet50", "Densenet121"], ["ShuffleNetV2", "MobileNetV2"],
        ["ShuffleNetV2", "Densenet121"], ["MobileNetV2", "Densenet121"],
    ]  # fmt: skip
    assert [[names[i] for i in pair] for pair in teacher_pairs(5)] == cv_dd
    for ipc_index in range(10):  # the pair depends on the IPC index, not on the step
        assert {active_teachers("pair", 5, t, ipc_index) for t in range(5)} == {
            tuple(names.index(n) for n in cv_dd[ipc_index])
        }
    assert active_teachers("pair", 5, 0, 10) == (0, 1)  # past C(5, 2): cycles
    assert active_teachers("pair", 2, 3, 4) == (0, 1)


def test_uniform_weights():
    assert teacher_weights("uniform", [0.0, 0.0, 0.0]) == [1 / 3] * 3
    assert teacher_weights("uniform", [0.0]) == [1.0]


def test_prior_weights_are_cv_dds_softmax_of_top1_over_5():
    # CV-DD's ImageNet-1K priors of ResNet-18 and ResNet-50 (recover/recover.py): 56.4, 42.3.
    w = teacher_weights("prior", [56.4, 42.3])
    e18, e50 = math.exp(56.4 / 5), math.exp(42.3 / 5)
    assert w == pytest.approx([e18 / (e18 + e50), e50 / (e18 + e50)], rel=1e-12)
    assert w[0] == pytest.approx(1 / (1 + math.exp(-(56.4 - 42.3) / 5)), rel=1e-12)
    assert sum(teacher_weights("prior", [90.0, 90.0, 10.0])) == pytest.approx(1)
    assert teacher_weights("prior", [70.0, 70.0]) == [0.5, 0.5]


# --------------------------------------------------------------------------------------------
# The ensemble's loss, against the papers' formula by hand


def _bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
    )  # fmt: skip
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize(
    ("policy", "weighting", "iteration", "ipc_index"),
    [("all", "prior", 0, 0), ("round-robin", "uniform", 4, 0), ("pair", "prior", 3, 2)],
)
def test_ensemble_loss_is_the_weighted_sum_of_each_teachers_ce_and_bn(
    policy, weighting, iteration, ipc_index
):
    models = [_bn_net(seed) for seed in range(3)]
    priors = [60.0, 50.0, 40.0]
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    r_bn, first = 0.01, 10.0
    forward = EnsembleForward(models)
    matchings = [delt_ext.BNStatMatching(m, first_bn_multiplier=first) for m in models]
    target = EnsembleTarget(forward, matchings, policy, weighting, priors)
    target.begin_chunk(Chunk(0, (0, 1, 2, 3, 4, 0), (ipc_index,) * 6))
    target.set_step(iteration)
    logits = forward(x)
    loss = target.ensemble_loss(logits, y, r_bn)

    active = active_teachers(policy, 3, iteration, ipc_index)
    weights = teacher_weights(weighting, [priors[i] for i in active])
    assert logits.shape == (6, len(active), 5)
    expected = 0.0
    for i, w in zip(active, weights, strict=True):
        model = models[i]
        features = model[0](x)
        mean, var = features.mean((0, 2, 3)), features.var((0, 2, 3), unbiased=False)
        bn = first * (
            torch.linalg.vector_norm(model[1].running_var - var)
            + torch.linalg.vector_norm(model[1].running_mean - mean)
        )
        expected += w * (nn.functional.cross_entropy(model(x), y) + r_bn * bn)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    for m in matchings:
        m.remove()


def test_equalized_mean_is_g_vbsms_norm_equalized_average():
    # relabel/generate_soft_label_with_db.py: norm over (batch, classes) per teacher, scaled to
    # the teachers' mean norm, then the mean over teachers.
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # norm 5
    b = torch.tensor([[0.0, 0.0], [0.0, 15.0]])  # norm 15
    mean_norm = 10.0
    expected = (a / 5 * mean_norm + b / 15 * mean_norm) / 2
    assert torch.allclose(equalized_mean(torch.stack([a, b])), expected)
    # One teacher: its own logits.
    assert torch.allclose(equalized_mean(a[None]), a)
    # The batch's norm: a soft label depends on its batch (as G-VBSM's).
    models = [_bn_net(0), _bn_net(1)]
    x = torch.randn(4, 3, 8, 8)
    out = EnsembleLogits(models)(x)
    stacked = torch.stack([m(x) for m in models])
    assert torch.allclose(out, equalized_mean(stacked))


# --------------------------------------------------------------------------------------------
# delt recover --teachers


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory):
    """Another teacher of SYNTHETIC (a convnet1 of width 4), beside conftest's tiny_teacher."""
    from delt.teacher import TeacherConfig, train_teacher

    return train_teacher(
        TeacherConfig(
            out=str(tmp_path_factory.mktemp("teacher_b")), dataset=SYNTHETIC, arch="convnet1",
            width=4, epochs=1, batch_size=16, amp="none", channels_last=False, progress=False,
        )
    )  # fmt: skip


def _config(tiny_teacher, second_teacher, out, **flags) -> RecoverConfig:
    values = dict(
        teacher=str(tiny_teacher.path), teachers=(str(second_teacher.path),), ipc=3,
        out=str(out), method="cda", iterations=4, batch_size=4, progress=False,
    )  # fmt: skip
    return RecoverConfig(**{**values, **flags})


@pytest.mark.parametrize("policy", ["all", "round-robin", "pair"])
def test_two_teacher_recover_records_the_teachers_and_differs_from_one(
    tiny_teacher, second_teacher, tmp_path, policy
):
    result = recover(
        _config(tiny_teacher, second_teacher, tmp_path / "two", teacher_policy=policy,
                method="sre2l", teacher_weights="prior")
    )  # fmt: skip
    one = recover(
        RecoverConfig(
            teacher=str(tiny_teacher.path),
            ipc=3,
            out=str(tmp_path / "one"),
            method="sre2l",
            iterations=4,
            batch_size=4,
            progress=False,
        )
    )
    assert torch.isfinite(result.images).all()
    assert not torch.equal(result.images, one.images)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    recorded = manifest["teachers"]
    assert [t["path"] for t in recorded] == [str(tiny_teacher.path), str(second_teacher.path)]
    from delt.io import sha256_file

    assert [t["sha256"] for t in recorded] == [
        sha256_file(tiny_teacher.path), sha256_file(second_teacher.path)
    ]  # fmt: skip
    # The priors default to each checkpoint's recorded test top-1.
    assert [t["prior"] for t in recorded] == [t["test_accuracy"] for t in recorded]
    assert manifest["config"]["teacher_policy"] == policy
    identity = json.loads((tmp_path / "two" / "run.json").read_text())
    assert identity["teachers_sha256"] == [sha256_file(second_teacher.path)]
    assert "teachers" not in json.loads((tmp_path / "one" / "manifest.json").read_text())


def test_round_robin_forwards_one_teacher_per_step(
    tiny_teacher, second_teacher, tmp_path, monkeypatch
):
    steps, second = [], []
    original_load, original_forward = synthesis_module.load_teachers, EnsembleForward.forward

    def load(*args, **kwargs):
        teachers = original_load(*args, **kwargs)
        teachers[0].model.register_forward_hook(lambda *_: second.append(len(steps) - 1))
        return teachers

    def forward(self, inputs):
        steps.append(tuple(self.active))
        return original_forward(self, inputs)

    monkeypatch.setattr(synthesis_module, "load_teachers", load)
    monkeypatch.setattr(EnsembleForward, "forward", forward)
    recover(
        _config(tiny_teacher, second_teacher, tmp_path, teacher_policy="round-robin", ipc=1,
                iterations=5)
    )  # fmt: skip
    # One chunk of 4 images (IPC 1): teacher t mod 2 at step t.
    assert steps == [(0,), (1,), (0,), (1,), (0,)]
    assert second == [1, 3]  # the second teacher ran at steps 1 and 3 only


def test_resume_after_a_kill_is_bitwise_identical(
    tiny_teacher, second_teacher, tmp_path, monkeypatch
):
    flags = dict(teacher_policy="pair", teacher_weights="prior", method="cda", batch_size=2)
    reference = recover(_config(tiny_teacher, second_teacher, tmp_path / "whole", **flags))
    count_calls(monkeypatch, synthesis_module, "optimize_chunk", die_after=1)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        recover(_config(tiny_teacher, second_teacher, out, **flags))
    assert [p.name for p in (out / "chunks").iterdir()] == ["00000.pt"]
    rerun = count_calls(monkeypatch, synthesis_module, "optimize_chunk")
    resumed = recover(_config(tiny_teacher, second_teacher, out, **flags))
    assert len(rerun) == 5  # 6 chunks, chunk 0 kept
    assert torch.equal(resumed.images, reference.images)
    assert (out / "distilled.pt").read_bytes() == (tmp_path / "whole" / "distilled.pt").read_bytes()
    for png in (tmp_path / "whole" / "images").glob("*/*.png"):
        assert png.read_bytes() == (out / png.relative_to(tmp_path / "whole")).read_bytes()


def test_a_resume_with_other_teachers_is_refused(
    tiny_teacher, second_teacher, three_class_teacher, tmp_path
):
    recover(_config(tiny_teacher, second_teacher, tmp_path))
    with pytest.raises(Exception, match="another configuration"):
        recover(_config(tiny_teacher, second_teacher, tmp_path, teacher_policy="round-robin"))
    with pytest.raises(Exception, match="another configuration"):
        recover(
            RecoverConfig(
                teacher=str(tiny_teacher.path), ipc=3, out=str(tmp_path), method="cda",
                iterations=4, batch_size=4, progress=False,
            )
        )  # fmt: skip


def test_pdd_stages_take_several_teachers(tiny_teacher, second_teacher, tmp_path):
    result = recover(
        _config(tiny_teacher, second_teacher, tmp_path, method="pdd", base="cda", stages=2,
                ipc=2, teacher_policy="pair")
    )  # fmt: skip
    assert result.images.shape[0] == 8
    assert len(json.loads((tmp_path / "manifest.json").read_text())["teachers"]) == 2


# --------------------------------------------------------------------------------------------
# Refusals, before any work


def _argv(teacher, out, *flags):
    return [
        "recover", "--teacher", str(teacher), "--out", str(out), "--method", "cda", "--ipc",
        "1", "--iterations", "2", "--no-progress", *map(str, flags),
    ]  # fmt: skip


def _refused(capsys, argv, *expected):
    status = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("delt ")]
    assert status == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]


def _edited_teacher(tiny_teacher, folder: Path, edit) -> Path:
    """A copy of the tiny teacher whose recorded dataset ``edit`` changes (what its sidecar
    says it was trained on)."""
    checkpoint = load_checkpoint(tiny_teacher.path)
    meta = json.loads(json.dumps(checkpoint.meta))
    edit(meta["dataset"])
    path = folder / "edited.pt"
    # Random weights of the architecture for the edited data.
    model = build_model(meta["arch"], DatasetInfo.from_dict(meta["dataset"]), meta["arch_kwargs"])
    save_checkpoint(path, model, meta)
    return path


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d.update(class_names=list(reversed(d["class_names"]))), "class order"),
        (lambda d: d.update(resolution=16), "takes 3x16x16 images"),
        (lambda d: d.update(mean=[0.1, 0.2, 0.3]), "normalization"),
    ],
    ids=["class-order", "resolution", "normalization"],
)
def test_a_teacher_of_other_data_is_refused(tiny_teacher, tmp_path, capsys, edit, expected):
    other = _edited_teacher(tiny_teacher, tmp_path, edit)
    out = tmp_path / "out"
    _refused(capsys, _argv(tiny_teacher.path, out, "--teachers", other), "--teachers", expected)
    assert not out.exists()


def test_a_teacher_of_another_dataset_is_refused(
    tiny_teacher, three_class_teacher, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = _argv(tiny_teacher.path, out, "--teachers", three_class_teacher.path)
    _refused(capsys, argv, "--teachers", "3 classes")
    assert not out.exists()


def test_a_teacher_given_twice_is_refused(tiny_teacher, second_teacher, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(tiny_teacher.path, out, "--teachers", second_teacher.path, second_teacher.path)
    _refused(capsys, argv, "given twice")
    copy = tmp_path / "copy.pt"
    copy.write_bytes(Path(tiny_teacher.path).read_bytes())
    Path(copy.with_suffix(".json")).write_bytes(
        Path(tiny_teacher.path).with_suffix(".json").read_bytes()
    )
    _refused(capsys, _argv(tiny_teacher.path, out, "--teachers", copy), "same SHA-256")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--teacher-policy", "round-robin"], "--teacher-policy applies with --teachers"),
        (["--teacher-weights", "prior"], "--teacher-weights applies with --teachers"),
        (["--teacher-priors", "50"], "--teacher-priors applies with --teachers"),
        (["--teachers", "B", "--teacher-priors", "50", "60"], "applies with --teacher-weights"),
        (["--teachers", "B", "--teacher-weights", "prior", "--teacher-priors", "50"], "expected 2"),
        (
            ["--teachers", "B", "--teacher-weights", "prior", "--teacher-priors", "50,150"],
            "[0, 100]",
        ),
        (["--teachers", "B", "--chunks-per-step", "2"], "--chunks-per-step 1"),
    ],
)
def test_teacher_flags_are_checked(tiny_teacher, tmp_path, capsys, flags, expected):
    _refused(capsys, _argv(tiny_teacher.path, tmp_path / "out", *flags), expected)


def test_a_policy_on_a_method_that_does_not_take_it_is_refused(
    tiny_teacher, tiny_selection, second_teacher, tmp_path, capsys
):
    argv = _argv(tiny_teacher.path, tmp_path / "o", "--teachers", second_teacher.path)
    rded = [a if a != "cda" else "rded" for a in argv if a not in ("--iterations", "2")]
    _refused(capsys, rded, "--teachers applies to the methods that optimize pixels")
    delt = [a if a != "cda" else "delt" for a in argv]
    delt += ["--selection", str(tiny_selection), "--round-iterations", "1"]
    _refused(capsys, [*delt, "--teacher-policy", "pair"], "--teacher-policy pair", "delt")


def test_stats_and_per_class_matching_are_refused_with_teachers(
    tiny_teacher, second_teacher, tmp_path, capsys
):
    argv = _argv(tiny_teacher.path, tmp_path / "o", "--teachers", second_teacher.path)
    _refused(capsys, [*argv, "--match", "class", "--stats", "x.pt"], "--match global")


# --------------------------------------------------------------------------------------------
# delt eval --teachers, delt relabel --teachers


def test_eval_with_teachers_records_them_and_is_its_own_evaluation(
    tiny_teacher, second_teacher, tiny_set, tmp_path
):
    import shutil

    folder = tmp_path / "set"
    shutil.copytree(tiny_set, folder)
    base = dict(distilled=str(folder), epochs=2, progress=False, device="cpu")
    one = evaluate(EvalConfig(**base))
    document = json.loads((folder / "eval.json").read_text())
    assert "teachers" not in document and "teachers_sha256" not in json.dumps(document)
    two = evaluate(EvalConfig(**base, teachers=(str(second_teacher.path),)))
    document = json.loads((folder / "eval.json").read_text())
    assert [t["path"] for t in document["teachers"]] == [
        json.loads((folder / "manifest.json").read_text())["teacher"]["path"],
        str(second_teacher.path),
    ]
    assert not two.reused
    again = evaluate(EvalConfig(**base, teachers=(str(second_teacher.path),)))
    assert again.reused and again.accuracy_mean == two.accuracy_mean
    assert not one.reused


def test_eval_refuses_teachers_with_stored_or_hard_labels(second_teacher, tiny_set, capsys):
    for flags in (["--hard-labels"], ["--labels", "x.labels"]):
        argv = ["eval", "--distilled", str(tiny_set), "--teachers", str(second_teacher.path)]
        _refused(capsys, [*argv, *flags], "--teachers label batches online")


def test_relabel_with_teachers_stores_the_ensembles_logits(
    tiny_teacher, second_teacher, tiny_set, tmp_path
):
    import shutil

    from delt.relabel import RelabelConfig, relabel
    from delt.soft_labels import open_store

    out = tmp_path / "ens.labels"
    relabel(
        RelabelConfig(
            distilled=str(tiny_set), epochs=1, teachers=(str(second_teacher.path),),
            out=str(out), device="cpu", progress=False,
        )
    )  # fmt: skip
    single = tmp_path / "one.labels"
    relabel(
        RelabelConfig(distilled=str(tiny_set), epochs=1, out=str(single), device="cpu",
                      progress=False)
    )  # fmt: skip
    ensemble, one = open_store(out), open_store(single)
    assert ensemble.digest != one.digest
    # The stored ensemble labels train the student bitwise as the online ensemble does (with
    # --workers 1: the per-batch-seeded augmentation a store replays).
    folder = tmp_path / "set"
    shutil.copytree(tiny_set, folder, ignore=shutil.ignore_patterns("eval*"))
    base = dict(distilled=str(folder), epochs=1, seeds=(0,), progress=False, device="cpu")
    stored = evaluate(EvalConfig(**base, labels=str(out), out=str(tmp_path / "stored.json")))
    online = evaluate(
        EvalConfig(
            **base, teachers=(str(second_teacher.path),), workers=1,
            out=str(tmp_path / "online.json"),
        )
    )  # fmt: skip
    alone = evaluate(EvalConfig(**base, labels=str(single), out=str(tmp_path / "alone.json")))
    assert stored.seeds[0].train_loss == online.seeds[0].train_loss
    assert stored.seeds[0].train_loss != alone.seeds[0].train_loss


# --------------------------------------------------------------------------------------------
# torchrun: two Gloo ranks give the one-process set, bit for bit

DELT = ["-m", "delt"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DELT_DIST_TIMEOUT="60")
    env["PYTHONSAFEPATH"] = "1"
    return env


@pytest.mark.slow
def test_two_ranks_give_the_one_process_set_bitwise(tiny_teacher, second_teacher, tmp_path):
    flags = [
        "--teachers", str(second_teacher.path), "--teacher-policy", "round-robin",
        "--teacher-weights", "prior", "--batch-size", "2", "--ipc", "4", "--iterations", "6",
        "--device", "cpu",
    ]  # fmt: skip

    def argv(out):
        return ["recover", "--teacher", str(tiny_teacher.path), "--out", str(out), "--method",
                "cda", "--no-progress", *flags]  # fmt: skip

    assert main(argv(tmp_path / "one")) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run(
        [*torchrun, *DELT, *argv(tmp_path / "two")], env=_env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = tmp_path / "one"
    names = [str(p.relative_to(one)) for p in sorted(one.glob("images/*/*.png"))]
    names.append("distilled.pt")
    assert len(names) == 17
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_online_ensemble_labels_are_refused_under_torchrun(
    second_teacher, tiny_set, tmp_path, monkeypatch
):
    # A rank holds its rows of each batch, and G-VBSM's norms are the whole batch's.
    import delt.evaluate as evaluate_module
    from delt.config import ConfigError
    from delt.distributed import World

    monkeypatch.setattr(evaluate_module, "world", lambda: World(0, 2, 0))
    config = EvalConfig(
        distilled=str(tiny_set), teachers=(str(second_teacher.path),), epochs=1,
        out=str(tmp_path / "e.json"), progress=False, device="cpu",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="delt relabel --teachers"):
        evaluate(config)
    assert not (tmp_path / "e.json").exists()
