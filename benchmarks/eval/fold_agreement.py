"""Predictions of BN-folded test passes vs the unfolded model's, on Fashion-MNIST's test split.

Students (ConvNet-3 w64) trained as ``delt eval --random-real`` trains them (IPC 10, soft labels
of the committed teacher, seeds 0..S-1, tested after several epoch counts) and the teacher
itself: each model's argmax on the 10,000 test images, unfolded (eager, contiguous, batch 500:
main's pass) and as :func:`delt.batches.evaluate_accuracy` runs it (a BN-folded copy,
channels_last, batch 100). Prints, per model, the disagreements and the top-2 logit margin of
each, and the two accuracies.

Usage: OMP_NUM_THREADS=1 python benchmarks/eval/fold_agreement.py [SEEDS] [EPOCHS...]
"""

import sys

import torch
from delt.batches import evaluate_accuracy, inference_copy
from delt.data import load_like
from delt.evaluate import draw_random_real
from delt.models import build_model, load_checkpoint
from delt.student_augment import StudentAugment
from delt.student_trainer import PROTOCOL, StudentTrainer, TrainSettings

ROOT = "/usr/share/datasets/fashion-mnist"
TEACHER = "benchmarks/quality/paper-b/teacher/teacher.pt"


def compare(name: str, model: torch.nn.Module, test_set) -> int:
    model.eval()
    images = test_set.images(range(len(test_set)))
    with torch.no_grad():
        reference = torch.cat([model(images[s : s + 500]) for s in range(0, len(images), 500)])
        folded = inference_copy(model, channels_last=True)
        logits = torch.cat(
            [
                folded(images[s : s + 100].contiguous(memory_format=torch.channels_last))
                for s in range(0, len(images), 100)
            ]
        )
    differ = reference.argmax(1) != logits.argmax(1)
    top2 = reference.topk(2, dim=1).values
    margins = (top2[:, 0] - top2[:, 1])[differ].tolist()
    before = 100.0 * float((reference.argmax(1) == test_set.targets).float().mean())
    after = evaluate_accuracy(model, test_set, torch.device("cpu"))
    print(
        f"{name}: {int(differ.sum())} of {len(images)} predictions differ "
        f"(top-2 margins {margins}); max |logit diff| {float((logits - reference).abs().max()):.2e}"
        f"; accuracy unfolded {before:.2f}% folded pass {after:.2f}%",
        flush=True,
    )
    return int(differ.sum())


def main() -> None:
    torch.set_num_threads(1)
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    checkpoints = [int(e) for e in sys.argv[2:]] or [5, 15, 30]
    teacher = load_checkpoint(TEACHER)
    info = teacher.info
    train_set, test_set = load_like(info, "train", ROOT), load_like(info, "test", ROOT)
    total = compare("teacher", teacher.model, test_set)
    teacher_model = teacher.model.eval().requires_grad_(False)
    for seed in range(seeds):
        images, labels, _ = draw_random_real(train_set, 10, seed)
        torch.manual_seed(seed)
        student = build_model("convnet3", info, {"width": 64})
        generator = torch.Generator().manual_seed(seed)
        augment = StudentAugment(info, PROTOCOL.randaugment_ops, PROTOCOL.randaugment_magnitude,
                                 PROTOCOL.min_crop, generator)  # fmt: skip
        trainer = StudentTrainer(
            student, teacher_model, augment, TrainSettings(batch_size=50), max(checkpoints),
            PROTOCOL.lr, PROTOCOL.weight_decay, torch.device("cpu"), generator,
        )  # fmt: skip
        for epoch in range(1, max(checkpoints) + 1):
            trainer.train_epoch(images, labels)
            if epoch in checkpoints:
                total += compare(f"student seed {seed} epoch {epoch}", trainer.student, test_set)
    print(f"total disagreements: {total}")


if __name__ == "__main__":
    main()
