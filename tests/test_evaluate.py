"""delt.evaluate: the brief soft-label student check (replaced by `delt eval` later)."""

import torch
from delt.data import load_like
from delt.evaluate import StudentConfig, load_distilled, train_student
from delt.models import load_checkpoint
from delt.recover import RecoverConfig, recover


def test_student_trains_on_a_distilled_set(tiny_teacher, tmp_path):
    out = tmp_path / "cda"
    config = RecoverConfig(
        teacher=str(tiny_teacher.path), ipc=2, out=str(out), method="cda", iterations=4,
        progress=False,
    )  # fmt: skip
    recover(config)
    images, labels, manifest = load_distilled(out)
    assert images.shape[0] == labels.shape[0] == 8 and manifest["method"] == "cda"
    checkpoint = load_checkpoint(tiny_teacher.path)
    test_set = load_like(checkpoint.info, "test")
    result = train_student(
        images, checkpoint.model, checkpoint.meta, test_set,
        StudentConfig(epochs=2, batch_size=4), torch.device("cpu"), progress=False,
    )  # fmt: skip
    assert result.steps == 4
    assert 0.0 <= result.test_accuracy <= 100.0
