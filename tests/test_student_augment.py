"""delt.student_augment: ShufflePatches, StudentAugment (and augmenting some rows of a batch as
the whole batch would), CutMix and its hard-label loss."""

import math

import pytest
import torch
from delt.models import load_checkpoint
from delt.student_augment import (
    CutMixParams,
    StudentAugment,
    apply_cutmix,
    cutmix_cross_entropy,
    sample_cutmix,
    shuffle_patches,
)

# --------------------------------------------------------------------------------------------
# CutMix


def test_cutmix_pastes_the_partners_box():
    images = torch.stack([torch.full((1, 4, 4), 1.0), torch.full((1, 4, 4), 2.0)])
    params = CutMixParams(torch.tensor([1, 0]), top=1, bottom=3, left=0, right=2, lam=0.75)
    mixed = apply_cutmix(images, params)
    expected_first = torch.ones(4, 4)
    expected_first[1:3, 0:2] = 2.0
    assert torch.equal(mixed[0, 0], expected_first)
    assert torch.equal(mixed[1, 0], 3.0 - expected_first)
    assert torch.equal(images[0], torch.full((1, 4, 4), 1.0))  # input untouched


def test_paste_writes_each_partners_box_in_place():
    images = torch.zeros(2, 1, 3, 3)
    partners = torch.stack([torch.full((1, 3, 3), 5.0), torch.full((1, 3, 3), 7.0)])
    CutMixParams(torch.tensor([0, 1]), top=0, bottom=2, left=1, right=3, lam=5 / 9).paste(
        images, partners
    )
    box = torch.zeros(3, 3)
    box[0:2, 1:3] = 1.0
    assert torch.equal(images[0, 0], 5.0 * box) and torch.equal(images[1, 0], 7.0 * box)


def test_sampled_cutmix_lambda_is_the_box_area_and_reproducible():
    for seed in range(20):
        params = sample_cutmix(8, 28, 28, 1.0, torch.Generator().manual_seed(seed))
        assert 0 <= params.top <= params.bottom <= 28 and 0 <= params.left <= params.right <= 28
        area = (params.bottom - params.top) * (params.right - params.left)
        assert params.lam == pytest.approx(1 - area / 28**2)
        assert sorted(params.permutation.tolist()) == list(range(8))
        again = sample_cutmix(8, 28, 28, 1.0, torch.Generator().manual_seed(seed))
        assert (again.top, again.left, again.lam) == (params.top, params.left, params.lam)


def test_cutmix_cross_entropy_mixes_both_labels():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]]))
    labels = torch.tensor([0, 1])
    params = CutMixParams(torch.tensor([1, 0]), 0, 0, 0, 0, lam=0.75)
    own = -(math.log(0.5) + math.log(0.6)) / 2
    partner = -(math.log(0.25) + math.log(0.2)) / 2
    loss = cutmix_cross_entropy(logits, labels, params)
    assert loss.item() == pytest.approx(0.75 * own + 0.25 * partner)


def test_cutmix_cross_entropy_of_some_rows_mixes_their_labels_and_their_partners():
    # A DDP rank's share: logits of rows 2:4 of a batch of 6; partners from the whole batch.
    logits = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    params = CutMixParams(torch.tensor([5, 4, 0, 1, 3, 2]), 0, 0, 0, 0, lam=0.6)
    rows = slice(2, 4)
    own = torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0]))
    partner = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    loss = cutmix_cross_entropy(logits, labels, params, rows)
    assert torch.equal(loss, 0.6 * own + (1.0 - 0.6) * partner)
    assert torch.equal(cutmix_cross_entropy(logits, labels, None, rows), own)
    # The whole batch (rows None) is the one-process loss.
    everything = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    expected = 0.6 * torch.nn.functional.cross_entropy(everything, labels) + (
        1.0 - 0.6
    ) * torch.nn.functional.cross_entropy(everything, labels[params.permutation])
    assert torch.equal(cutmix_cross_entropy(everything, labels, params), expected)


# --------------------------------------------------------------------------------------------
# ShufflePatches, RandAugment, crops and flips


def test_student_augment_keeps_shape_and_range(tiny_teacher):
    info = load_checkpoint(tiny_teacher.path).info
    images = info.normalize(torch.rand(6, 3, 8, 8))
    augment = StudentAugment(info, 2, 6, 0.25, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = augment(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    low, high = info.pixel_bounds()
    assert bool((out >= low - 1e-5).all() and (out <= high + 1e-5).all())
    torch.manual_seed(0)
    again = StudentAugment(info, 2, 6, 0.25, torch.Generator().manual_seed(0))(images)
    assert torch.equal(out, again)


def test_shuffle_patches_permutes_whole_column_then_row_strips():
    # An RDED-like 2x2 grid of constant tiles on a 4x4 image: every output keeps 2x2 constant
    # tiles, the same four values, and tiles that shared a row (column) still do.
    tiles = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    image = tiles.repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None]
    batch = image.expand(64, 3, 4, 4).contiguous()
    out = shuffle_patches(batch, 2, torch.Generator().manual_seed(0))
    seen = set()
    for result in out:
        grid = result[:, ::2, ::2]
        assert torch.equal(result, grid.repeat_interleave(2, 1).repeat_interleave(2, 2))
        assert sorted(grid[0].flatten().tolist()) == [1.0, 2.0, 3.0, 4.0]
        assert sorted(grid[0, 0].tolist()) in ([1.0, 2.0], [3.0, 4.0])  # rows stay rows
        seen.add(tuple(grid[0].flatten().tolist()))
    assert len(seen) == 4  # 2 column orders x 2 row orders
    again = shuffle_patches(batch, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(shuffle_patches(batch, 1, torch.Generator()), batch)
    with pytest.raises(ValueError, match="factor 3 must divide 4x4"):
        shuffle_patches(batch, 3, torch.Generator())


def test_student_augment_without_shuffle_patches_is_unchanged(tiny_teacher):
    info = load_checkpoint(tiny_teacher.path).info
    images = info.normalize(torch.rand(6, 3, 8, 8))
    plain = StudentAugment(info, 0, 6, 0.5, torch.Generator().manual_seed(1))(images)
    off = StudentAugment(info, 0, 6, 0.5, torch.Generator().manual_seed(1), None)(images)
    on = StudentAugment(info, 0, 6, 0.5, torch.Generator().manual_seed(1), 2)(images)
    assert torch.equal(plain, off) and not torch.equal(plain, on)


@pytest.mark.parametrize("patches", [None, 2])
def test_augmenting_some_rows_gives_those_rows_of_the_whole_batch(tiny_teacher, patches):
    # What a DDP rank does: the whole batch's draws, only its rows augmented. The rows equal
    # the whole batch's, and both generators end where the whole batch leaves them.
    info = load_checkpoint(tiny_teacher.path).info
    images = info.normalize(torch.rand(9, 3, 8, 8, generator=torch.Generator().manual_seed(3)))
    for seed in range(6):
        whole = StudentAugment(info, 2, 6, 0.25, torch.Generator().manual_seed(seed), patches)
        torch.manual_seed(100 + seed)
        expected = whole(images)
        state_after, generator_after = torch.get_rng_state(), whole.generator.get_state()
        part = StudentAugment(info, 2, 6, 0.25, torch.Generator().manual_seed(seed), patches)
        assert part.augments_subsets()
        rows = torch.tensor([1, 4, 5, 8])
        torch.manual_seed(100 + seed)
        plan = part.plan(images.shape)
        assert torch.equal(part.apply(images[rows], plan, rows), expected[rows])
        assert torch.equal(torch.get_rng_state(), state_after)
        assert torch.equal(part.generator.get_state(), generator_after)
        empty = part.apply(images[:0], part.plan(images.shape), torch.empty(0, dtype=torch.int64))
        assert empty.shape == (0, 3, 8, 8)
