"""Pure schedules: EarlyLate rounds, chunking, cosine LR, crop curriculum, PDD stage sizes, the
per-stage iterations that give PDD DELT's image-iterations, and the student's per-epoch LR
factors.

Nothing here touches a model or a tensor (DELT, Shen et al., CVPR 2025; PDD, Chen et al., ICLR
2024). EarlyLate: the IPC images of a class, in selection order, are split into
``R = iterations // round_iterations`` rounds (the first ``ipc % R`` one larger); image ``j``
joins at its round's start.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from itertools import accumulate

import delt_ext
from delt.config import check_int

__all__ = [
    "CROP_CURRICULA",
    "LR_SCHEDULES",
    "Chunk",
    "PddIterations",
    "chunk_schedule",
    "class_contiguous_chunks",
    "class_interleaved_chunks",
    "cosine_factor",
    "cosine_lr",
    "crop_min_scale",
    "early_late_iterations",
    "half_cosine_factor",
    "image_start_rounds",
    "lr_factor",
    "pdd_matched_iterations",
    "round_group_sizes",
    "stage_epochs",
    "stage_offsets",
    "stage_round_iterations",
    "stage_sizes",
]


def _check_rounds(iterations: int, round_iterations: int) -> int:
    check_int("iterations", iterations)
    check_int("round_iterations", round_iterations)
    if round_iterations > iterations:
        raise ValueError(
            f"round_iterations ({round_iterations}) must be <= iterations ({iterations}): "
            "the first round cannot be longer than the whole loop"
        )
    if iterations % round_iterations:
        # DELT's code indexes rounds with it // RI; a remainder would create a partial round that
        # the paper never uses. Refuse instead of guessing.
        raise ValueError(
            f"iterations ({iterations}) must be a multiple of round_iterations ({round_iterations})"
        )
    return iterations // round_iterations


def round_group_sizes(ipc: int, num_rounds: int) -> list[int]:
    """How many images of a class join at each round: ``ipc // R``, the first ``ipc % R`` one more.

    >>> round_group_sizes(10, 8)
    [2, 2, 1, 1, 1, 1, 1, 1]
    """
    check_int("ipc", ipc)
    check_int("num_rounds", num_rounds)
    base, extra = divmod(ipc, num_rounds)
    return [base + (1 if r < extra else 0) for r in range(num_rounds)]


def image_start_rounds(ipc: int, iterations: int, round_iterations: int) -> list[int]:
    """The round at which each image of a class joins, in selection order (0 = from the start).

    Image ``j`` starts at the first round ``r`` with ``j < cumsum(group sizes)[r]`` (DELT).
    """
    num_rounds = _check_rounds(iterations, round_iterations)
    check_int("ipc", ipc)
    bounds = list(accumulate(round_group_sizes(ipc, num_rounds)))
    return [bisect.bisect_right(bounds, j) for j in range(ipc)]


def early_late_iterations(ipc: int, iterations: int, round_iterations: int) -> list[int]:
    """Iterations each image of a class gets under EarlyLate, in selection order.

    Args:
        ipc: images per class (>= 1).
        iterations: MI, the loop length; the earliest images get all of it.
        round_iterations: RI; a later group joins every RI steps. ``round_iterations ==
            iterations`` (one round) gives every image ``iterations``: no EarlyLate, as for IPC 1.

    Returns:
        ``ipc`` integers, non-increasing. With MI 4000 and RI 500 at IPC 10:
        ``[4000, 4000, 3500, 3500, 3000, 2500, 2000, 1500, 1000, 500]``.
    """
    return [
        iterations - start * round_iterations
        for start in image_start_rounds(ipc, iterations, round_iterations)
    ]


def cosine_lr(iteration: int, total: int, base_lr: float) -> float:
    """SRe2L/CDA/DELT's LR: ``0.5 * (1 + cos(pi * iteration / total)) * base_lr``, no warm-up."""
    check_int("total", total)
    return 0.5 * (1.0 + math.cos(math.pi * iteration / total)) * base_lr


# The recovery's minimum crop scale over the loop: "fixed" (0.08 throughout, SRe2L), "cosine"
# (CDA/DELT's easy-to-hard 1 -> 0.08), "full" (1.0: the whole image, the IPC-1 ablation's).
CROP_CURRICULA = ("fixed", "cosine", "full")
FIXED_MIN_SCALE = 0.08


def crop_min_scale(iteration: int, total: int, curriculum: str) -> float:
    """The minimum crop area fraction at ``iteration`` of ``total`` under ``curriculum``."""
    if curriculum == "cosine":
        return delt_ext.crop_scale_schedule(iteration, total)
    if curriculum == "fixed":
        return FIXED_MIN_SCALE
    if curriculum == "full":
        return 1.0
    raise ValueError(f"curriculum must be one of {CROP_CURRICULA}, got {curriculum!r}")


@dataclass(frozen=True)
class Chunk:
    """One independent optimization problem of the recovery: a batch of images to synthesize.

    Attributes:
        index: position of the chunk in the run (seeds and file names derive from it).
        classes: class index of each image of the chunk.
        within_class: index of each image inside its class (0 = first in selection order).
    """

    index: int
    classes: tuple[int, ...]
    within_class: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.classes)

    def positions(self, ipc: int) -> list[int]:
        """Positions of the images in the class-major output (``class * ipc + within_class``)."""
        return [c * ipc + j for c, j in zip(self.classes, self.within_class, strict=True)]


def class_contiguous_chunks(num_classes: int, ipc: int, batch_size: int) -> list[Chunk]:
    """DELT's batching: the class-major sequence of images cut into runs of ``batch_size``.

    A chunk holds consecutive images in class-major, selection order, so it may span several
    classes or part of one (DELT's recover script: a DataLoader with ``shuffle=False`` over the
    selection).
    """
    check_int("num_classes", num_classes)
    check_int("ipc", ipc)
    check_int("batch_size", batch_size)
    total = num_classes * ipc
    runs = [range(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]
    return [
        Chunk(index, tuple(p // ipc for p in run), tuple(p % ipc for p in run))
        for index, run in enumerate(runs)
    ]


def class_interleaved_chunks(num_classes: int, ipc: int, batch_size: int) -> list[Chunk]:
    """SRe2L/CDA's batching: an outer loop over the IPC index, one image per class per batch.

    For each ``ipc_index`` the classes are taken ``batch_size`` at a time (SRe2L's
    ``targets = arange(1000)[kk:kk + 100]``), so a chunk never holds two images of one class.
    """
    check_int("num_classes", num_classes)
    check_int("ipc", ipc)
    check_int("batch_size", batch_size)
    chunks = []
    for ipc_index in range(ipc):
        for start in range(0, num_classes, batch_size):
            classes = tuple(range(start, min(start + batch_size, num_classes)))
            chunks.append(
                Chunk(index=len(chunks), classes=classes, within_class=(ipc_index,) * len(classes))
            )
    return chunks


def chunk_schedule(
    within_class: tuple[int, ...] | list[int], ipc: int, iterations: int, round_iterations: int
) -> tuple[int, list[int]]:
    """Loop length of one chunk and the iteration at which each of its images joins.

    Rounds in which no image of the chunk is active yet are dropped and the loop shortens by RI
    for each (DELT l.74-87): a chunk holding only late images of a class starts its loop at the
    earliest of them. Every image still gets ``early_late_iterations(...)[j]`` steps.

    Returns:
        ``(total_iterations, start_iterations)``: the chunk's loop length and, per image,
        the first iteration it is forwarded in (0 for the earliest images).
    """
    if len(within_class) == 0:
        raise ValueError("a chunk must hold at least one image")
    starts = image_start_rounds(ipc, iterations, round_iterations)
    chunk_rounds = [starts[j] for j in within_class]
    skipped = min(chunk_rounds)
    total = iterations - skipped * round_iterations
    return total, [(r - skipped) * round_iterations for r in chunk_rounds]


# --------------------------------------------------------------------------------------------
# Progressive synthesis (PDD)


def stage_sizes(
    ipc: int, stages: int, stage_ipc: list[int] | tuple[int, ...] | None = None
) -> list[int]:
    """Images per class that each of the ``stages`` stages synthesizes; they sum to ``ipc``.

    Without ``stage_ipc`` every stage gets ``ipc // stages``, the first ``ipc % stages`` one more
    (the rule of :func:`round_group_sizes`; PDD's scripts use equal stages).

    >>> stage_sizes(10, 5)
    [2, 2, 2, 2, 2]
    >>> stage_sizes(50, 5, [20, 10, 10, 5, 5])
    [20, 10, 10, 5, 5]
    """
    check_int("ipc", ipc)
    check_int("stages", stages)
    if stages > ipc:
        raise ValueError(
            f"stages ({stages}) must be <= ipc ({ipc}): every stage synthesizes at least one "
            "image per class"
        )
    if stage_ipc is None:
        return round_group_sizes(ipc, stages)
    sizes = list(stage_ipc)
    if len(sizes) != stages:
        raise ValueError(f"stage_ipc must list one size per stage ({stages}), got {len(sizes)}")
    for size in sizes:
        check_int("every stage_ipc entry", size)
    if sum(sizes) != ipc:
        raise ValueError(f"stage_ipc must sum to ipc ({ipc}), got {sizes} (sum {sum(sizes)})")
    return sizes


def stage_offsets(sizes: list[int] | tuple[int, ...]) -> list[int]:
    """Within-class position of each stage's first image in the union (class-major, stage order).

    Stage ``k``'s images of class ``c`` sit at ``c * ipc + offsets[k] + j``, so the union after
    stage ``k`` is, per class, the prefix of length ``offsets[k] + sizes[k]``.

    >>> stage_offsets([2, 2, 2])
    [0, 2, 4]
    """
    for size in sizes:
        check_int("every stage size", size)
    return [0, *accumulate(sizes)][: len(sizes)]


def stage_round_iterations(stage_ipc: int, iterations: int, round_iterations: int) -> int:
    """DELT's RI inside one stage: one round (every image gets all iterations) at 1 image per
    class, as DELT does at IPC 1; otherwise ``round_iterations``."""
    check_int("stage_ipc", stage_ipc)
    _check_rounds(iterations, round_iterations)
    return iterations if stage_ipc == 1 else round_iterations


def stage_epochs(total_epochs: int, stages: int) -> list[int]:
    """Epochs of each stage of a stage-wise evaluation: ``total_epochs`` split across stages.

    PDD trains on U_1, then U_1 ∪ U_2, ... "without additional training time" (PDD, ICLR 2024): the
    stages share the epochs of one plain evaluation. Every stage gets ``total // stages``; the
    remainder goes to the *last* stages, which train on the largest unions.

    >>> stage_epochs(300, 5)
    [60, 60, 60, 60, 60]
    >>> stage_epochs(12, 5)
    [2, 2, 2, 3, 3]
    """
    check_int("total_epochs", total_epochs)
    check_int("stages", stages)
    if stages > total_epochs:
        raise ValueError(
            f"total_epochs ({total_epochs}) must be >= stages ({stages}): every stage trains "
            "for at least one epoch"
        )
    base, extra = divmod(total_epochs, stages)
    return [base + (1 if k >= stages - extra else 0) for k in range(stages)]


@dataclass(frozen=True)
class PddIterations:
    """PDD's per-stage iterations matched to a DELT run (:func:`pdd_matched_iterations`).

    Attributes:
        iterations: per-stage MI (``delt recover --method pdd --iterations``).
        round_iterations: per-stage RI (``--round-iterations``; a stage of one image per class
            has a single round, :func:`stage_round_iterations`).
        image_iterations: PDD's image-iterations over all stages and classes.
        delt_image_iterations: DELT's, the target.
    """

    iterations: int
    round_iterations: int
    image_iterations: int
    delt_image_iterations: int


def pdd_matched_iterations(
    ipc: int, iterations: int, round_iterations: int, classes: int, stages: int
) -> PddIterations:
    """PDD's per-stage MI and RI for ``stages`` stages over a DELT base, so that the run spends
    DELT's image-iterations (DELT: IPC ``ipc``, MI ``iterations``, RI ``round_iterations``).

    DELT costs ``sum(early_late_iterations(ipc, MI, RI))`` per class. Every PDD stage runs
    DELT's number of rounds ``R = MI / RI`` over its own :func:`stage_sizes` images, with
    per-stage MI ``t`` and RI ``t / R``; ``t`` is the multiple of ``R`` below ``4 * MI`` whose
    total is closest to DELT's (the smaller on a tie).

    >>> matched = pdd_matched_iterations(10, 400, 50, classes=10, stages=5)
    >>> matched.iterations, matched.round_iterations, matched.image_iterations
    (272, 34, 25500)
    """
    check_int("classes", classes)
    rounds = _check_rounds(iterations, round_iterations)
    delt = sum(early_late_iterations(ipc, iterations, round_iterations)) * classes
    sizes = stage_sizes(ipc, stages)

    def cost(stage_iterations: int) -> int:
        per_class = 0
        for size in sizes:
            stage_round = stage_round_iterations(size, stage_iterations, stage_iterations // rounds)
            per_class += sum(early_late_iterations(size, stage_iterations, stage_round))
        return per_class * classes

    best = min(range(rounds, 4 * iterations, rounds), key=lambda t: (abs(cost(t) - delt), t))
    return PddIterations(best, best // rounds, cost(best), delt)


def half_cosine_factor(epoch: int, epochs: int) -> float:
    """DELT/RDED's per-epoch LR factor ``0.5 * (1 + cos(pi * epoch / (2 * epochs)))``.

    1 at epoch 0, 0.5 at ``epoch == epochs``: half a cosine period over 2E, so training ends at
    about half the base LR (not at 0, unlike SRe2L's FKD).
    """
    check_int("epochs", epochs)
    return 0.5 * (1.0 + math.cos(math.pi * epoch / (2 * epochs)))


def cosine_factor(epoch: int, epochs: int) -> float:
    """SRe2L's per-epoch LR factor ``0.5 * (1 + cos(pi * epoch / epochs))`` (``--cos`` of its
    ``train_FKD.py``): 1 at epoch 0, 0 at ``epoch == epochs``."""
    check_int("epochs", epochs)
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


# The student's LR schedules by name: ``delt eval --lr-schedule``.
LR_SCHEDULES = {"half-cosine": half_cosine_factor, "cosine": cosine_factor}


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The LR factor of ``schedule`` (a key of :data:`LR_SCHEDULES`) after ``epoch`` of
    ``epochs``."""
    return LR_SCHEDULES[schedule](epoch, epochs)
