"""delt.schedules: DELT's EarlyLate tables (Shen et al., CVPR 2025), chunking, cosine LR, and
PDD's stage sizes, stage-wise epochs and the per-stage iterations matched to DELT's cost."""

import math

import pytest
from delt.schedules import (
    chunk_schedule,
    class_contiguous_chunks,
    class_interleaved_chunks,
    cosine_lr,
    early_late_iterations,
    image_start_rounds,
    pdd_matched_iterations,
    round_group_sizes,
    stage_epochs,
    stage_offsets,
    stage_round_iterations,
    stage_sizes,
)


def test_ipc10_table():
    assert round_group_sizes(10, 8) == [2, 2, 1, 1, 1, 1, 1, 1]
    iterations = early_late_iterations(10, 4000, 500)
    assert iterations == [4000, 4000, 3500, 3500, 3000, 2500, 2000, 1500, 1000, 500]
    assert sum(iterations) == 25_500


def test_ipc50_table():
    assert round_group_sizes(50, 8) == [7, 7, 6, 6, 6, 6, 6, 6]
    expected = (
        [4000] * 7 + [3500] * 7 + [3000] * 6 + [2500] * 6 + [2000] * 6 + [1500] * 6
        + [1000] * 6 + [500] * 6
    )  # fmt: skip
    assert early_late_iterations(50, 4000, 500) == expected
    assert sum(expected) == 115_500  # -42.3% of 200,000


def test_ipc100_table():
    assert round_group_sizes(100, 8) == [13, 13, 13, 13, 12, 12, 12, 12]
    iterations = early_late_iterations(100, 4000, 500)
    assert iterations[:13] == [4000] * 13 and iterations[-12:] == [500] * 12
    assert sum(iterations) == 229_000


def test_ri_1k_at_ipc50():
    iterations = early_late_iterations(50, 4000, 1000)
    assert iterations == [4000] * 13 + [3000] * 13 + [2000] * 12 + [1000] * 12
    assert 1 - sum(iterations) / 200_000 == pytest.approx(0.365)


def test_ipc1_and_single_round_give_every_image_all_iterations():
    assert early_late_iterations(1, 4000, 500) == [4000]
    assert early_late_iterations(7, 4000, 4000) == [4000] * 7


def test_fewer_images_than_rounds():
    # IPC 3 with 8 rounds: groups 1,1,1,0,... -> the three images join at rounds 0, 1, 2.
    assert image_start_rounds(3, 4000, 500) == [0, 1, 2]
    assert early_late_iterations(3, 4000, 500) == [4000, 3500, 3000]


@pytest.mark.parametrize(
    "ipc, iterations, round_iterations, message",
    [
        (0, 4000, 500, "ipc"),
        (10, 4000, 5000, "round_iterations .* <= iterations"),
        (10, 4000, 300, "multiple"),
        (10, 0, 500, "iterations"),
        (10, 4000, 0, "round_iterations"),
    ],
)
def test_bad_arguments(ipc, iterations, round_iterations, message):
    with pytest.raises(ValueError, match=message):
        early_late_iterations(ipc, iterations, round_iterations)


def test_contiguous_chunks_follow_class_major_order():
    chunks = class_contiguous_chunks(num_classes=4, ipc=50, batch_size=100)
    assert len(chunks) == 2
    assert chunks[0].classes == (0,) * 50 + (1,) * 50
    assert chunks[1].within_class == tuple(range(50)) * 2
    assert chunks[1].positions(50) == list(range(100, 200))
    # A chunk may split a class; the within-class index keeps counting across chunks.
    split = class_contiguous_chunks(num_classes=2, ipc=5, batch_size=3)
    assert [c.within_class for c in split] == [(0, 1, 2), (3, 4, 0), (1, 2, 3), (4,)]
    assert [c.classes for c in split] == [(0, 0, 0), (0, 0, 1), (1, 1, 1), (1,)]


def test_interleaved_chunks_hold_one_image_per_class():
    chunks = class_interleaved_chunks(num_classes=250, ipc=2, batch_size=100)
    assert [len(c) for c in chunks] == [100, 100, 50, 100, 100, 50]
    for chunk in chunks:
        assert len(set(chunk.classes)) == len(chunk)
        assert len(set(chunk.within_class)) == 1
    assert chunks[3].classes[0] == 0 and chunks[3].within_class[0] == 1


def test_chunk_schedule_of_a_whole_class():
    total, starts = chunk_schedule(tuple(range(10)), 10, 4000, 500)
    assert total == 4000
    assert [total - s for s in starts] == early_late_iterations(10, 4000, 500)


def test_chunk_schedule_drops_leading_empty_rounds():
    # Only the late images 8 and 9 of an IPC 10 class (rounds 6 and 7): the loop shrinks to
    # 1000 iterations and each image still gets its own number of iterations.
    total, starts = chunk_schedule((8, 9), 10, 4000, 500)
    assert total == 1000
    assert starts == [0, 500]
    assert [total - s for s in starts] == [1000, 500]


def test_cosine_lr_matches_the_reference_table():
    # DELT's EarlyLate (Shen et al., CVPR 2025): lr at the round starts of a 4000-iteration
    # loop with lr0 = 0.25.
    expected = [0.250, 0.240, 0.213, 0.173, 0.125, 0.077, 0.037, 0.0095]
    got = [cosine_lr(500 * r, 4000, 0.25) for r in range(8)]
    assert got == pytest.approx(expected, abs=6e-4)
    assert cosine_lr(4000, 4000, 0.25) == pytest.approx(0.0)
    assert cosine_lr(2000, 4000, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


# --------------------------------------------------------------------------------------------
# PDD


def test_stage_sizes_default_to_equal_stages():
    assert stage_sizes(10, 5) == [2, 2, 2, 2, 2]
    assert stage_sizes(50, 5) == [10] * 5
    # Uneven: the first IPC % P stages get one more image per class.
    assert stage_sizes(7, 3) == [3, 2, 2]
    assert stage_sizes(5, 5) == [1] * 5
    assert stage_sizes(4, 1) == [4]


def test_explicit_stage_sizes_are_kept():
    assert stage_sizes(10, 3, [6, 3, 1]) == [6, 3, 1]
    assert stage_sizes(10, 3, (1, 1, 8)) == [1, 1, 8]


@pytest.mark.parametrize(
    "ipc, stages, explicit, message",
    [
        (4, 5, None, r"stages \(5\) must be <= ipc \(4\)"),
        (10, 2, [5, 4], r"sum to ipc \(10\)"),
        (10, 2, [5, 5, 0], "one size per stage"),
        (10, 2, [10, 0], "stage_ipc entry"),
        (0, 1, None, "ipc"),
        (3, 0, None, "stages"),
    ],
)
def test_bad_stage_sizes(ipc, stages, explicit, message):
    with pytest.raises(ValueError, match=message):
        stage_sizes(ipc, stages, explicit)


def test_stage_offsets_are_the_union_prefix_lengths():
    assert stage_offsets([2, 2, 2, 2, 2]) == [0, 2, 4, 6, 8]
    assert stage_offsets([6, 3, 1]) == [0, 6, 9]
    sizes = [3, 1, 4]
    assert [o + s for o, s in zip(stage_offsets(sizes), sizes, strict=True)] == [3, 4, 8]


def test_stage_round_iterations():
    # A stage with one image per class has no rounds, as DELT at IPC 1.
    assert stage_round_iterations(1, 4000, 500) == 4000
    assert stage_round_iterations(2, 4000, 500) == 500
    # Within a stage of 2 images per class DELT's rounds give them 4000 and 3500 iterations.
    assert early_late_iterations(2, 4000, stage_round_iterations(2, 4000, 500)) == [4000, 3500]
    with pytest.raises(ValueError, match="multiple"):
        stage_round_iterations(2, 4000, 300)


def test_stage_epochs_split_the_total_without_extra_training():
    assert stage_epochs(300, 5) == [60] * 5
    assert stage_epochs(12, 5) == [2, 2, 2, 3, 3]  # the remainder goes to the largest unions
    assert stage_epochs(7, 1) == [7]
    for total in range(5, 40):
        split = stage_epochs(total, 5)
        assert sum(split) == total and min(split) >= 1 and split == sorted(split)
    with pytest.raises(ValueError, match="at least one epoch"):
        stage_epochs(4, 5)


@pytest.mark.parametrize(
    "ipc, iterations, stage_iterations, pdd, delt",
    [(10, 400, 272, 25_500, 25_500),  # benchmarks/pdd/README.md: equal at IPC 10
     (50, 400, 360, 114_750, 115_500),  # 0.65% fewer at IPC 50
     (10, 4000, 2720, 255_000, 255_000),  # the quality benchmark's --budget paper
     (50, 4000, 3624, 1_155_150, 1_155_000)],
)  # fmt: skip
def test_pdd_matched_iterations(ipc, iterations, stage_iterations, pdd, delt):
    matched = pdd_matched_iterations(ipc, iterations, iterations // 8, classes=10, stages=5)
    assert matched.iterations == stage_iterations
    assert matched.round_iterations == stage_iterations // 8  # DELT's 8 rounds in every stage
    assert (matched.image_iterations, matched.delt_image_iterations) == (pdd, delt)
    # The image-iterations are what the stages cost: 5 stages of IPC/5, DELT's rounds in each.
    per_stage = early_late_iterations(ipc // 5, stage_iterations, stage_iterations // 8)
    assert matched.image_iterations == sum(per_stage) * 5 * 10
    assert sum(early_late_iterations(ipc, iterations, iterations // 8)) * 10 == delt


def test_pdd_matched_iterations_is_the_closest_multiple_of_the_rounds():
    # DELT with 4 rounds (MI 400, RI 100): the per-stage MI is a multiple of 4 and no other
    # multiple of 4 comes closer to DELT's cost.
    matched = pdd_matched_iterations(10, 400, 100, classes=3, stages=5)
    assert matched.iterations % 4 == 0 and matched.round_iterations == matched.iterations // 4

    def cost(t):
        return sum(early_late_iterations(2, t, t // 4)) * 5 * 3

    gap = abs(matched.image_iterations - matched.delt_image_iterations)
    assert all(abs(cost(t) - matched.delt_image_iterations) >= gap for t in range(4, 1600, 4))
    # Unequal stages (IPC 7 over 5 stages: 2, 2, 1, 1, 1); a one-image stage has one round.
    matched = pdd_matched_iterations(7, 400, 50, classes=10, stages=5)
    t = matched.iterations
    per_class = 2 * sum(early_late_iterations(2, t, t // 8)) + 3 * t
    assert matched.image_iterations == per_class * 10


@pytest.mark.parametrize(
    "ipc, iterations, round_iterations, stages, message",
    [(4, 400, 50, 5, "stages"), (10, 400, 30, 5, "multiple"), (10, 400, 50, 0, "stages")],
)
def test_pdd_matched_iterations_refuses_bad_arguments(
    ipc, iterations, round_iterations, stages, message
):
    with pytest.raises(ValueError, match=message):
        pdd_matched_iterations(ipc, iterations, round_iterations, classes=10, stages=stages)
