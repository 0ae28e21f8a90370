"""delt.methods.rded: RDED's construction (tiling, crop scoring order, seeded crops), class-major
outputs, resume after a kill, bad flags refused before any work."""

import json

import delt.methods.rded as rded_module
import pytest
import torch
from conftest import count_calls
from delt.config import ConfigError
from delt.data import load_like
from delt.distilled_set import load_distilled
from delt.methods.rded import (
    crop_candidates,
    pad_to,
    sample_crop_boxes,
    score_crops,
    select_crops,
    tile_crops,
)
from delt.models import load_checkpoint
from delt.recover import RecoverConfig, recover
from torch import nn
from torchvision.transforms.v2 import functional as TF


def _config(tiny_teacher, out, **overrides):
    values = dict(
        teacher=str(tiny_teacher.path), ipc=2, out=str(out), method="rded", candidates=10,
        num_crop=3, factor=2, progress=False,
    )  # fmt: skip
    values.update(overrides)
    return RecoverConfig(**values)


# --------------------------------------------------------------------------------------------
# The construction


def test_tiling_puts_the_crop_ranked_k_times_ipc_plus_i_in_tile_k_of_image_i():
    ipc, factor, size = 3, 2, 4
    ranked = torch.arange(ipc * factor**2, dtype=torch.float32)
    crops = ranked.view(-1, 1, 1, 1).expand(-1, 2, size, size).clone()
    crops[:, 1] += 100  # a second channel, to catch a channel/position mix-up
    crops[:, :, 0, 1] += 0.5  # a marked pixel, to catch a transposed tile
    images = tile_crops(crops, ipc, factor)
    assert images.shape == (ipc, 2, factor * size, factor * size)
    for i in range(ipc):
        for row in range(factor):
            for col in range(factor):
                tile = images[i, :, row * size : (row + 1) * size, col * size : (col + 1) * size]
                assert torch.equal(tile, crops[(row * factor + col) * ipc + i])


def test_tiling_with_factor_1_is_the_ranked_crops():
    crops = torch.randn(5, 3, 6, 6)
    assert torch.equal(tile_crops(crops, 5, 1), crops)


def test_selection_keeps_each_images_best_crop_then_the_lowest_overall():
    losses = torch.tensor(
        [
            [0.9, 0.3, 0.5],  # image 0: crop 1 (0.3)
            [0.2, 0.8, 0.2],  # image 1: crop 0 (0.2, the first of two equal minima)
            [0.7, 0.6, 0.1],  # image 2: crop 2 (0.1)
            [0.4, 0.4, 0.9],  # image 3: crop 0 (0.4)
            [0.3, 1.0, 1.0],  # image 4: crop 0 (0.3, equal to image 0's: image 0 first)
        ]
    )
    image, crop, loss = select_crops(losses, 4)
    assert image.tolist() == [2, 1, 0, 4]
    assert crop.tolist() == [2, 0, 1, 0]
    assert torch.allclose(loss, torch.tensor([0.1, 0.2, 0.3, 0.3]))


def test_crop_boxes_are_seeded_square_and_inside_the_image():
    first = sample_crop_boxes(1000, 5, 28, torch.Generator().manual_seed(7))
    again = sample_crop_boxes(1000, 5, 28, torch.Generator().manual_seed(7))
    other = sample_crop_boxes(1000, 5, 28, torch.Generator().manual_seed(8))
    assert first.shape == (1000, 5, 3) and first.dtype == torch.int64
    assert torch.equal(first, again) and not torch.equal(first, other)
    top, left, size = first.view(-1, 3).unbind(1)
    assert bool((size >= 1).all()) and bool((top >= 0).all()) and bool((left >= 0).all())
    assert bool((top + size <= 28).all()) and bool((left + size <= 28).all())
    # RDED's MultiRandomCrop keeps torchvision's default area range (0.08, 1): over 5000 draws
    # at 28 px the smallest side comes within a pixel of sqrt(0.08) * 28 = 7.9 (side 8: area
    # fraction below 8.5^2 / 784 = 0.092, about 1.3 % of draws) and the largest reaches 28
    # (above 27.5^2 / 784 = 0.965, about 3.8 %). A range of (0.25, 1) stops at side 14, (0.5, 1)
    # at 20.
    assert rded_module.CROP_SCALE == (0.08, 1.0)
    assert 7 <= int(size.min()) <= 9 and int(size.max()) == 28
    # A fifth of the draws have an area fraction <= 14.5^2 / 784 = 0.27: (0.27 - 0.08) / 0.92.
    assert 0.17 < float((size <= 14).double().mean()) < 0.24


def test_crops_are_torchvisions_antialiased_resized_crops():
    images = torch.randn(4, 3, 16, 16)
    boxes = sample_crop_boxes(4, 3, 16, torch.Generator().manual_seed(0))
    crops = crop_candidates(images, boxes, 8)
    assert crops.shape == (4, 3, 3, 8, 8)
    for j in range(4):
        for k in range(3):
            top, left, size = boxes[j, k].tolist()
            expected = TF.resized_crop(images[j], top, left, size, size, [8, 8], antialias=True)
            torch.testing.assert_close(crops[j, k], expected, rtol=0, atol=1e-5)


def test_padding_centres_the_crop_in_zeros():
    crop = torch.ones(1, 1, 3, 3)
    padded = pad_to(crop, 8)  # margin 5: 2 before, 3 after
    assert padded.shape == (1, 1, 8, 8)
    assert padded[0, 0, 2:5, 2:5].eq(1).all() and padded.sum() == 9


class _BrightnessTeacher(nn.Module):
    """Logits (mean pixel, -mean pixel): class 0 prefers bright inputs, class 1 dark ones."""

    def forward(self, x):
        mean = x.mean(dim=(1, 2, 3))
        return torch.stack([mean, -mean], dim=1)


def test_scores_are_the_teachers_cross_entropy_on_the_class_of_the_padded_crop():
    crops = torch.randn(7, 1, 4, 4)
    teacher = _BrightnessTeacher()
    losses = score_crops(teacher, crops, 1, 8, batch_size=3, device=torch.device("cpu"))
    logits = teacher(pad_to(crops, 8))
    expected = nn.functional.cross_entropy(
        logits, torch.ones(7, dtype=torch.int64), reduction="none"
    )
    torch.testing.assert_close(losses, expected)


def test_rded_class_keeps_the_lowest_loss_crops_and_records_their_sources(tiny_teacher):
    dataset = load_like(load_checkpoint(tiny_teacher.path).info)
    teacher = _BrightnessTeacher()
    ipc, factor, candidates, num_crop = 2, 2, 10, 3
    images, sources, _ = rded_module.rded_class(
        teacher, dataset, 0, ipc, candidates, num_crop, factor, torch.Generator().manual_seed(3),
        batch_size=4, device=torch.device("cpu"),
    )  # fmt: skip
    assert images.shape == (ipc, 3, 8, 8) and sources.shape == (ipc, factor**2, 4)
    # Every tile is the recorded crop of a class-0 training image, resized as RDED does.
    indices = sources[..., 0].flatten()
    assert bool((dataset.targets[indices] == 0).all()) and len(set(indices.tolist())) == 8
    losses = {}
    for i in range(ipc):
        for k in range(factor**2):
            index, top, left, size = sources[i, k].tolist()
            crop = TF.resized_crop(
                dataset.images([index])[0], top, left, size, size, [4, 4], antialias=True
            )
            row, col = divmod(k, factor)
            tile = images[i, :, row * 4 : (row + 1) * 4, col * 4 : (col + 1) * 4]
            torch.testing.assert_close(tile, crop, rtol=0, atol=1e-5)
            losses[(i, k)] = float(score_crops(teacher, tile[None], 0, 8, 1, torch.device("cpu")))
    # Ranked best first: tile k of image i is rank k * ipc + i.
    ranked = [losses[(r % ipc, r // ipc)] for r in range(ipc * factor**2)]
    assert ranked == sorted(ranked)
    # No candidate crop the selection passed over scores better than the worst kept one (redraw
    # the same candidates and boxes from the same seed).
    generator = torch.Generator().manual_seed(3)
    members = torch.nonzero(dataset.targets == 0).view(-1)
    chosen = members[torch.randperm(members.numel(), generator=generator)[:candidates]]
    boxes = sample_crop_boxes(candidates, num_crop, 8, generator)
    every = crop_candidates(dataset.images(chosen), boxes, 4).view(-1, 3, 4, 4)
    all_losses = score_crops(teacher, every, 0, 8, 64, torch.device("cpu")).view(candidates, -1)
    best_per_image = all_losses.min(dim=1).values.sort().values
    torch.testing.assert_close(torch.tensor(ranked), best_per_image[: ipc * factor**2])


# --------------------------------------------------------------------------------------------
# Runs


def test_recover_rded_writes_a_class_major_set_with_zero_iterations(tiny_teacher, tmp_path):
    result = recover(_config(tiny_teacher, tmp_path))
    images, labels, manifest = load_distilled(tmp_path)
    info = load_checkpoint(tiny_teacher.path).info
    assert images.shape == (8, 3, 8, 8) and torch.equal(images, result.images)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert manifest.method == "rded" and manifest.iterations_per_image == [0] * 8
    assert manifest.image_iterations == 0 and manifest.synthesis_seconds > 0
    low, high = info.pixel_bounds()
    assert bool(((images >= low - 1e-6) & (images <= high + 1e-6)).all())
    assert len(list((tmp_path / "images").glob("*/*.png"))) == 8
    document = json.loads((tmp_path / "manifest.json").read_text())
    assert document["config"]["candidates"] == 10 and "iterations" not in document["config"]
    crops = torch.tensor(document["rded_crops"])
    assert crops.shape == (8, 4, 4)
    dataset = load_like(info)
    # Image n's tiles come from training images of its own class.
    assert torch.equal(dataset.targets[crops[..., 0]], labels[:, None].expand(8, 4))


def test_rded_is_seeded(tiny_teacher, tmp_path):
    first = recover(_config(tiny_teacher, tmp_path / "a"))
    again = recover(_config(tiny_teacher, tmp_path / "b"))
    other = recover(_config(tiny_teacher, tmp_path / "c", seed=1))
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)


def test_rded_resume_after_a_kill_gives_the_same_bytes(tiny_teacher, tmp_path, monkeypatch):
    recover(_config(tiny_teacher, tmp_path / "uninterrupted"))
    count_calls(monkeypatch, rded_module, "rded_class", die_after=1)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        recover(_config(tiny_teacher, out))
    assert [p.name for p in (out / "chunks").iterdir()] == ["00000.pt"]
    assert not (out / "distilled.pt").exists()
    rerun = count_calls(monkeypatch, rded_module, "rded_class")
    recover(_config(tiny_teacher, out))
    assert len(rerun) == 3  # class 0 was loaded from its chunk file
    reference = tmp_path / "uninterrupted"
    assert (out / "distilled.pt").read_bytes() == (reference / "distilled.pt").read_bytes()
    for png in reference.glob("images/*/*.png"):
        assert png.read_bytes() == (out / png.relative_to(reference)).read_bytes()
    first = json.loads((reference / "manifest.json").read_text())
    second = json.loads((out / "manifest.json").read_text())
    assert first["rded_crops"] == second["rded_crops"]
    assert first["synthesis_seconds"] > 0 and second["synthesis_seconds"] > 0


def test_a_resume_with_other_rded_flags_is_refused(tiny_teacher, tmp_path):
    recover(_config(tiny_teacher, tmp_path))
    with pytest.raises(ConfigError, match="--num-crop: 3 -> 4"):
        recover(_config(tiny_teacher, tmp_path, num_crop=4))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(candidates=7), r"--candidates 7 must be >= --ipc x --factor\^2 = 8"),
        (dict(factor=0), "--factor must be an integer >= 1"),
        (dict(num_crop=0), "--num-crop must be an integer >= 1"),
        (dict(iterations=100), "--iterations applies to the methods that optimize pixels"),
        (dict(selection="s"), "--selection applies to the methods that optimize pixels"),
        (dict(lr=0.1), "--lr applies to the methods that optimize pixels"),
        (dict(method="cda", candidates=10), "--candidates applies to --method rded, not cda"),
        (
            dict(method="sre2l", factor=1, candidates=300, num_crop=5),
            "--factor applies to --method",
        ),
    ],
)
def test_bad_rded_flags_are_refused_by_the_config(tiny_teacher, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tiny_teacher, tmp_path, **overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(factor=3, candidates=18), "--factor 3 must divide the image resolution 8"),
        (dict(candidates=13), r"--candidates 13: class 0 \('class0'\) has only 12 training"),
    ],
)
def test_bad_data_for_rded_is_refused_before_any_work(
    tiny_teacher, tmp_path, monkeypatch, overrides, message
):
    monkeypatch.setattr(rded_module, "rded_class", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConfigError, match=message):
        recover(_config(tiny_teacher, tmp_path, **overrides))
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "chunks").exists()
