"""The lean student step (issue 32): no host read of the loss per step, and ``delt eval
--fold-teacher`` (the teacher's soft-label forward with BatchNorm folded), opt-in."""

import copy
import json

import delt.student_trainer as trainer_module
import numpy as np
import pytest
import torch
from delt.batches import inference_copy
from delt.config import ConfigError
from delt.evaluate import EvalConfig, evaluate
from delt.models import build_model, load_checkpoint
from delt.student_augment import StudentAugment
from delt.student_trainer import StudentTrainer, TrainSettings, _mean_loss


def _trainer(checkpoint, seed: int = 0, workers: int = 0) -> StudentTrainer:
    info = checkpoint.info
    torch.manual_seed(seed)
    student = build_model("convnet2", info, {"width": 4})
    generator = torch.Generator().manual_seed(seed)
    return StudentTrainer(
        student, copy.deepcopy(checkpoint.model), StudentAugment(info, 2, 6, 0.5, generator),
        TrainSettings(batch_size=4), total_epochs=3, lr=1e-3, weight_decay=0.01,
        device=torch.device("cpu"), generator=generator, workers=workers,
    )  # fmt: skip


def _images(info, count: int = 12):
    generator = torch.Generator().manual_seed(1)
    return info.normalize(torch.rand(count, 3, 8, 8, generator=generator)), torch.arange(count) % 4


def test_an_epoch_reads_no_step_loss_back(tiny_teacher, monkeypatch):
    # Every loss a step computes (its storage), and every read of one of them to the host.
    checkpoint = load_checkpoint(tiny_teacher.path)
    images, labels = _images(checkpoint.info)
    losses, reads = [], []
    kl = trainer_module.soft_label_kl

    def recorded_kl(*args):
        loss = kl(*args)
        losses.append(loss.untyped_storage().data_ptr())
        return loss

    monkeypatch.setattr(trainer_module, "soft_label_kl", recorded_kl)
    for name in ("__float__", "item", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original):
            if self.untyped_storage().data_ptr() in losses:  # alive all epoch: not reused
                reads.append(self)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    loss = _trainer(checkpoint).train_epoch(images, labels)  # 3 steps of 4
    assert len(losses) == 3 and np.isfinite(loss)
    assert reads == []  # no step's loss read by itself


def test_the_epoch_loss_is_the_mean_of_the_step_losses_read_one_by_one(tiny_teacher):
    # Two identical trainers: one by train_epoch, one step by step through the public step()
    # (which reads every loss), on the same batches and draws: the same parameters and loss.
    checkpoint = load_checkpoint(tiny_teacher.path)
    images, labels = _images(checkpoint.info)
    epoch_trainer, step_trainer = _trainer(checkpoint), _trainer(checkpoint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        loss = epoch_trainer.train_epoch(images, labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        order = torch.randperm(12, generator=step_trainer.generator)
        losses = [
            step_trainer.step(images[order[start : start + 4]], labels[order[start : start + 4]])
            for start in range(0, 12, 4)
        ]
    assert loss == float(np.mean(losses))
    for a, b in zip(
        epoch_trainer.student.parameters(), step_trainer.student.parameters(), strict=True
    ):
        assert torch.equal(a, b)


def test_mean_loss_equals_numpy_mean_of_the_floats():
    values = torch.rand(37, generator=torch.Generator().manual_seed(0)) * 3
    assert _mean_loss(list(values)) == float(np.mean([float(v) for v in values]))


@pytest.mark.parametrize(
    "overrides, flag",
    [({"hard_labels": True}, "--hard-labels"),
     ({"teacher_batch_stats": True}, "--teacher-batch-stats"),
     ({"labels": "store"}, "--labels")],
)  # fmt: skip
def test_fold_teacher_is_refused_where_no_teacher_forward_runs(tmp_path, overrides, flag):
    with pytest.raises(
        ConfigError, match=f"--fold-teacher: no teacher forward to fold with {flag}"
    ):
        EvalConfig(distilled=str(tmp_path), fold_teacher=True, progress=False, **overrides)


def test_fold_teacher_is_its_own_run_and_the_default_keeps_its_results(tiny_set, tmp_path):
    common = dict(distilled=str(tiny_set), epochs=2, seeds=(0,), eval_every=1, progress=False)
    out = str(tmp_path / "eval.json")
    plain = evaluate(EvalConfig(out=out, **common))
    folded = evaluate(EvalConfig(out=out, fold_teacher=True, **common))
    assert not plain.reused and not folded.reused  # not the default's numbers
    document = json.loads((tmp_path / "eval.json").read_text())
    assert document["config"]["fold_teacher"] is True
    assert evaluate(EvalConfig(out=out, fold_teacher=True, **common)).reused
    # The default run's results are kept beside them, recognised as its own (no flag recorded).
    again = evaluate(EvalConfig(out=out, **common))
    assert again.reused and again.seeds[0].train_loss == plain.seeds[0].train_loss


def test_a_folded_teacher_labels_within_float_rounding(tiny_teacher):
    checkpoint = load_checkpoint(tiny_teacher.path)
    model = checkpoint.model.eval()
    images, _ = _images(checkpoint.info, 32)
    folded = inference_copy(model, channels_last=True)
    with torch.no_grad():
        expected, actual = model(images), folded(images)
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
