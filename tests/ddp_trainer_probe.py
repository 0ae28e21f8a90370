"""Two StudentTrainer epochs, run by tests/test_distributed.py under torchrun (``python
ddp_trainer_probe.py TEACHER OUT``) and in its own process (:func:`main`), once augmenting in the
process (workers 0), once in one DataLoader worker.

It records, per rank, what the student saw (its input batch at every step), every CutMix
permutation drawn, how many images went through RandAugment for real (torchvision's transform is
wrapped, also in DataLoader workers), the losses and the generators' states at the end, in
``OUT/workers-<w>/rank-<r>.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import delt.student_trainer as trainer_module
import torch
from delt.distributed import session, world
from delt.models import build_model, load_checkpoint
from delt.student_augment import StudentAugment
from delt.student_trainer import StudentTrainer, TrainSettings
from torchvision.transforms import v2


def main(argv: list[str]) -> None:
    teacher_path, out = argv[0], Path(argv[1])
    torch.set_num_threads(1)
    with session("cpu"), torch.random.fork_rng(devices=[]):
        for workers in (0, 1):
            (out / f"workers-{workers}").mkdir(exist_ok=True)
            _probe(teacher_path, out / f"workers-{workers}", workers)


def _probe(teacher_path: str, out: Path, workers: int) -> None:
    rank = world().rank
    checkpoint = load_checkpoint(teacher_path)
    info = checkpoint.info
    teacher = checkpoint.model.requires_grad_(False).eval()
    images = info.normalize(torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(5)))
    labels = torch.arange(10) % info.num_classes
    torch.manual_seed(0)
    student = build_model("convnet2", info, {"width": 4})
    generator = torch.Generator().manual_seed(0)
    augment = StudentAugment(info, 2, 6, 0.25, generator, shuffle_patches=2)
    trainer = StudentTrainer(
        student, teacher, augment, TrainSettings(batch_size=4, cutmix_beta=1.0),
        total_epochs=2, lr=1e-3, weight_decay=0.01, device=torch.device("cpu"),
        generator=generator, workers=workers,
    )  # fmt: skip
    if world().size > 1:
        # Its check of RandAugment's draws runs RandAugment: done before the counting starts
        # (on the ranks only, so that the test sees it draw nothing from the generators).
        assert augment.augments_subsets()
    calls = out / f"calls-rank-{rank}.txt"
    real_forward = v2.RandAugment.forward

    def counted(self, *inputs):
        with open(calls, "a") as handle:  # appended by the DataLoader workers too
            handle.write(f"{os.getpid()}\n")
        return real_forward(self, *inputs)

    v2.RandAugment.forward = counted
    permutations = []
    real_sample = trainer_module.sample_cutmix

    def recorded(*args, **kwargs):
        params = real_sample(*args, **kwargs)
        permutations.append(params.permutation.clone())
        return params

    trainer_module.sample_cutmix = recorded
    seen = []
    trainer.student.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    try:
        losses = [trainer.train_epoch(images, labels) for _ in range(2)]
    finally:
        v2.RandAugment.forward = real_forward
        trainer_module.sample_cutmix = real_sample
    torch.save(
        {
            "seen": seen,
            "permutations": permutations,
            "losses": losses,
            "rng": torch.get_rng_state(),
            "generator": generator.get_state(),
            "world": world().size,
        },
        out / f"rank-{rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
