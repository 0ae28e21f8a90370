"""delt.fkd_labels: `delt import-labels` reads FKD relabel folders in SRe2L's on-disk format
(github.com/VILA-Lab/SRe2L, relabel/generate_soft_label.py and relabel/utils_fkd.py), and
`delt eval --labels` trains on their recorded batches, crops, flips and mixes; bad folders are
one-line errors naming the file."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from delt.distilled_set import load_stored, normalized
from delt.evaluate import EvalConfig, evaluate
from delt.fkd_labels import (
    ImportLabelsConfig,
    fkd_epoch_orders,
    import_fkd_labels,
    replay_fkd_batch,
)
from delt.soft_labels import open_store
from delt.student_trainer import StudentTrainer

EPOCHS = 2
BATCH = 3  # 8 images: batches of 3, 3, 2 (the last one short, as drop_last=False leaves it)


def _sampler_batches(num_images, seed, epochs, batch=BATCH):
    """SRe2L's batch membership, from torch's own RandomSampler and BatchSampler (the way
    generate_soft_label.py's DataLoader and utils_fkd.get_img2batch_idx_list draw it)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(range(num_images), generator=generator)
    batches = torch.utils.data.BatchSampler(sampler, batch_size=batch, drop_last=False)
    return [[list(indices) for indices in batches] for _ in range(epochs)]


def write_fkd_folder(
    root, labels, num_classes, size, mix="cutmix", seed=42, fp16=True, batch=BATCH
):
    """A folder as SRe2L's generate_soft_label.py writes it: epoch_E/batch_B.tar, each a
    torch.save of [coords (b, 4) float32, flip (b,) bool, mix index (b,) int64, lam (float),
    box [numpy int64 x4], logits (b, C)], the collated per-image crops and flips of
    RandomResizedCropWithCoords / RandomHorizontalFlipWithRes, then mix_aug's draws. The logits
    put the largest value on the class of each row's sampled image. Returns, per epoch and
    batch, the integer crop boxes (top, left, height, width) drawn and the list saved."""
    rng = np.random.default_rng(0)
    np.random.seed(0)  # mix_aug draws λ and the box centre from numpy's global generator
    boxes = []
    for epoch, batches in enumerate(_sampler_batches(len(labels), seed, EPOCHS, batch)):
        folder = root / f"epoch_{epoch}"
        folder.mkdir(parents=True)
        boxes.append([])
        for index, members in enumerate(batches):
            samples, drawn = [], []
            for _ in members:
                height = int(rng.integers(1, size + 1))
                width = int(rng.integers(1, size + 1))
                top = int(rng.integers(0, size - height + 1))
                left = int(rng.integers(0, size - width + 1))
                drawn.append((top, left, height, width))
                coords = torch.FloatTensor((top / size, left / size, height / size, width / size))
                samples.append((coords, bool(rng.integers(0, 2))))
            coords, flip = torch.utils.data.default_collate(samples)
            count = len(members)
            if mix == "none":
                partner = lam = box = None
            else:
                partner = torch.randperm(count)
                lam = np.random.beta(1.0, 1.0)
                box = None
                if mix == "cutmix":
                    cut = np.sqrt(1.0 - lam)
                    cut_w, cut_h = int(size * cut), int(size * cut)
                    cx, cy = np.random.randint(size), np.random.randint(size)
                    box = [
                        np.clip(cx - cut_w // 2, 0, size), np.clip(cy - cut_h // 2, 0, size),
                        np.clip(cx + cut_w // 2, 0, size), np.clip(cy + cut_h // 2, 0, size),
                    ]  # fmt: skip
            logits = torch.randn(count, num_classes)
            logits[torch.arange(count), labels[members]] += 100.0
            logits = logits.half() if fp16 else logits
            torch.save([coords, flip, partner, lam, box, logits], folder / f"batch_{index}.tar")
            boxes[-1].append((drawn, [coords, flip, partner, lam, box, logits]))
    return boxes


def _import(tiny_set, folder, out, **overrides):
    values = dict(fkd=str(folder), distilled=str(tiny_set), out=str(out))
    values.update(overrides)
    return import_fkd_labels(ImportLabelsConfig(**values))


def _set(tiny_set):
    images, labels, manifest = load_stored(tiny_set)
    return images, labels, manifest.dataset


@pytest.fixture(scope="module")
def cutmix_folder(tiny_set, tmp_path_factory):
    _, labels, info = _set(tiny_set)
    root = tmp_path_factory.mktemp("fkd") / "FKD_cutmix_fp16"
    boxes = write_fkd_folder(root, labels, info.num_classes, info.resolution)
    return root, boxes


@pytest.fixture(scope="module")
def cutmix_store(tiny_set, cutmix_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("fkd-store") / "fkd.labels"
    result = _import(tiny_set, cutmix_folder[0], out)
    return out, result


def test_epoch_orders_are_torch_random_sampler_passes():
    # Each RandomSampler pass also draws an unused permutation: epoch 1 is not randperm #2.
    orders = fkd_epoch_orders(8, 42)
    expected = _sampler_batches(8, 42, 3)
    for epoch in range(3):
        order = next(orders).tolist()
        assert [order[s : s + BATCH] for s in range(0, 8, BATCH)] == expected[epoch]


def test_import_reads_the_folder_into_a_checked_store(tiny_set, cutmix_folder, cutmix_store):
    out, result = cutmix_store
    assert (result.epochs, result.batch_size, result.mix) == (EPOCHS, BATCH, "cutmix")
    assert result.agreement == 1.0  # the writer's logits peak at each sampled image's class
    store = open_store(out)  # every epoch's SHA-256 checked
    assert store.layout.replay == "fkd" and store.layout.dtype == "fp16"
    assert store.protocol["fkd_seed"] == 42 and store.protocol["num_images"] == 8
    assert store.header["origin"]["format"].startswith("FKD relabel folder")
    again = _import(tiny_set, cutmix_folder[0], out)
    assert again.reused and again.size == result.size


def test_the_student_sees_the_recorded_crops_flips_and_cutmix(
    tiny_set, cutmix_folder, cutmix_store, tmp_path, monkeypatch
):
    root, written = cutmix_folder
    images, labels, info = _set(tiny_set)
    seen, targets = [], []
    original = StudentTrainer._optimize

    def recording(self, batch, label_batch, params, rows):
        seen.append(batch.clone())
        targets.append(self.soft_labels.logits(self.epochs_done, self._position, slice(None)))
        return original(self, batch, label_batch, params, rows)

    monkeypatch.setattr(StudentTrainer, "_optimize", recording)
    result = evaluate(
        EvalConfig(
            distilled=str(tiny_set), epochs=EPOCHS, seeds=(0,), eval_every=EPOCHS,
            labels=str(cutmix_store[0]), out=str(tmp_path / "eval.json"), progress=False,
        )
    )  # fmt: skip
    assert math.isfinite(result.seeds[0].train_loss[-1])
    document = json.loads((tmp_path / "eval.json").read_text())
    assert document["identity"]["labels_sha256"] == open_store(cutmix_store[0]).digest
    assert document["config"]["batch_size"] == BATCH
    # By hand, from the recorded integer boxes, flips and CutMix of each file.
    step = 0
    size = info.resolution
    for epoch, batches in enumerate(_sampler_batches(8, 42, EPOCHS)):
        for index, members in enumerate(batches):
            boxes, (coords, flip, partner, lam, box, logits) = written[epoch][index]
            expected = []
            for row, member in enumerate(members):
                top, left, height, width = boxes[row]
                image = normalized(images[member : member + 1], info)
                crop = image[:, :, top : top + height, left : left + width]
                crop = F.interpolate(
                    crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True
                )
                expected.append(torch.flip(crop, dims=[3]) if flip[row] else crop)
            expected = torch.cat(expected)
            x1, y1, x2, y2 = (int(v) for v in box)
            expected[:, :, x1:x2, y1:y2] = expected[partner][:, :, x1:x2, y1:y2].clone()
            torch.testing.assert_close(seen[step], expected, rtol=0, atol=1e-6)
            assert torch.equal(targets[step], logits.float())
            step += 1
    assert step == len(seen) == EPOCHS * 3


def test_mixup_and_unmixed_folders_replay_as_recorded(tiny_set, tmp_path):
    images, labels, info = _set(tiny_set)
    for mix in ("mixup", "none"):
        root = tmp_path / mix
        written = write_fkd_folder(
            root, labels, info.num_classes, info.resolution, mix=mix, fp16=False
        )
        store = open_store(_import(tiny_set, root, tmp_path / f"{mix}.labels").path)
        assert store.protocol["mix"] == mix and store.layout.dtype == "fp32"
        coords, flip, partner, lam, box, _ = written[1][0][1]
        members = _sampler_batches(8, 42, 2)[1][0]
        batch = normalized(images[members], info)
        plain = replay_fkd_batch(batch, coords, flip, None, torch.full((5,), math.nan), 8)
        stored = store.rows(1, "mix", slice(0, 3))[0]
        replayed = replay_fkd_batch(
            batch, store.rows(1, "coords", slice(0, 3)), store.rows(1, "flip", slice(0, 3)),
            None if mix == "none" else store.rows(1, "partner", slice(0, 3)), stored, 8,
        )  # fmt: skip
        if mix == "mixup":
            assert box is None and math.isnan(float(stored[1]))
            torch.testing.assert_close(replayed, lam * plain + (1 - lam) * plain[partner])
        else:
            assert partner is None and lam is None
            assert torch.equal(replayed, plain)


def test_a_wrong_fkd_seed_is_flagged_by_the_labels_disagreeing(
    tiny_set, cutmix_folder, tmp_path, caplog
):
    with caplog.at_level("WARNING"):
        result = _import(tiny_set, cutmix_folder[0], tmp_path / "s.labels", fkd_seed=7)
    assert result.agreement <= 0.5
    assert "is --fkd-seed 7 the folder's" in caplog.text


class Payload:
    """An object a pickle could rebuild by running its class's code."""


def _cli_error(args, capsys):
    from delt.cli import main

    status = main([*args])
    err = capsys.readouterr().err.strip().splitlines()
    return status, err[-1]


def _copy(cutmix_folder, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(cutmix_folder[0], root)
    return root


def _import_error(tiny_set, root, tmp_path, capsys):
    status, line = _cli_error(
        ["import-labels", "--fkd", str(root), "--distilled", str(tiny_set),
         "--out", str(tmp_path / "x.labels")], capsys,
    )  # fmt: skip
    assert status == 2
    assert not (tmp_path / "x.labels").exists()
    assert not (tmp_path / "x.labels.partial").exists()
    return line


def test_a_truncated_file_is_refused_naming_it(tiny_set, cutmix_folder, tmp_path, capsys):
    root = _copy(cutmix_folder, tmp_path)
    path = root / "epoch_1" / "batch_1.tar"
    path.write_bytes(path.read_bytes()[:200])
    line = _import_error(tiny_set, root, tmp_path, capsys)
    assert line.startswith(f"delt import-labels: error: --fkd {path}: not a readable torch.save")


def test_a_wrong_shape_is_refused_naming_it(tiny_set, cutmix_folder, tmp_path, capsys):
    root = _copy(cutmix_folder, tmp_path)
    path = root / "epoch_1" / "batch_0.tar"
    data = list(cutmix_folder[1][1][0][1])
    data[0] = data[0][:, :3]
    torch.save(data, path)
    assert _import_error(tiny_set, root, tmp_path, capsys) == (
        f"delt import-labels: error: --fkd {path}: coords (entry 1): expected a (3, 4) float32 "
        "tensor"
    )


def test_objects_that_are_not_data_are_never_unpickled(tiny_set, cutmix_folder, tmp_path, capsys):
    root = _copy(cutmix_folder, tmp_path)
    path = root / "epoch_0" / "batch_2.tar"
    data = list(cutmix_folder[1][0][2][1])
    data[3] = Payload()  # an arbitrary class: torch.load(weights_only=True) refuses it
    torch.save(data, path)
    assert _import_error(tiny_set, root, tmp_path, capsys) == (
        f"delt import-labels: error: --fkd {path}: holds objects other than tensors, lists and "
        "numbers (refused, not unpickled)"
    )


def test_a_missing_epoch_folder_is_refused(tiny_set, cutmix_folder, tmp_path, capsys):
    root = _copy(cutmix_folder, tmp_path)
    (root / "epoch_2").mkdir()
    shutil.rmtree(root / "epoch_1")
    shutil.copytree(root / "epoch_0", root / "epoch_3")
    assert _import_error(tiny_set, root, tmp_path, capsys) == (
        f"delt import-labels: error: --fkd {root}: epoch folder epoch_1 is missing"
    )


def test_a_folder_for_another_image_count_or_class_count_is_refused(tiny_set, tmp_path, capsys):
    _, labels, info = _set(tiny_set)
    root = tmp_path / "six"
    write_fkd_folder(root, labels[:6], info.num_classes, info.resolution)
    assert _import_error(tiny_set, root, tmp_path, capsys) == (
        f"delt import-labels: error: --fkd {root}: its batches hold 6 images (2 batches of 3), "
        f"the set {tiny_set} has 8: a folder made for another set"
    )
    root = tmp_path / "three"
    write_fkd_folder(root, labels.clamp(max=2), 3, info.resolution)
    assert _import_error(tiny_set, root, tmp_path, capsys) == (
        f"delt import-labels: error: --fkd {root / 'epoch_0' / 'batch_0.tar'}: logits of 3 "
        "classes, the set has 4"
    )


def test_a_store_for_another_set_or_batch_size_is_refused_by_eval(
    tiny_set, cutmix_store, tmp_path, capsys
):
    other = tmp_path / "other"
    shutil.copytree(tiny_set, other, ignore=shutil.ignore_patterns("chunks", "*.labels"))
    images, labels, manifest = load_stored(other)
    from delt.distilled_set import save_distilled

    save_distilled(other, images.flip(0).contiguous(), labels.flip(0).contiguous(), manifest)
    common = ["--epochs", "1", "--labels", str(cutmix_store[0]), "--no-progress",
              "--device", "cpu", "--out", str(tmp_path / "e.json")]  # fmt: skip
    status, line = _cli_error(["eval", "--distilled", str(other), *common], capsys)
    assert status == 2
    assert line.startswith(
        f"delt eval: error: --labels {cutmix_store[0]} was imported for another set: "
        "distilled_sha256: store SHA-256"
    )
    status, line = _cli_error(
        ["eval", "--distilled", str(tiny_set), "--batch-size", "4", *common], capsys
    )
    assert status == 2 and line == (
        f"delt eval: error: --batch-size 4: the FKD labels of {cutmix_store[0]} are recorded in "
        "batches of 3; pass --batch-size 3 or leave it out (a --protocol's batch size counts as "
        "given)"
    )


def test_sre2l_protocol_trains_on_imported_labels(tiny_set, cutmix_store, tmp_path, caplog):
    # SRe2L's recipe (cosine LR, its AdamW) on its own kind of labels: no "not done here" note
    # about stored labels, and the recorded batch size given explicitly.
    with caplog.at_level("WARNING"):
        result = evaluate(
            EvalConfig(
                distilled=str(tiny_set), protocol="sre2l", epochs=1, batch_size=BATCH,
                seeds=(0,), labels=str(cutmix_store[0]), out=str(tmp_path / "e.json"),
                progress=False,
            )
        )  # fmt: skip
    assert math.isfinite(result.seeds[0].train_loss[-1])
    assert "stored once offline" not in caplog.text


def test_files_written_under_numpy_1_are_read(cutmix_folder, tmp_path):
    # SRe2L's released folders (2023) pickle the CutMix box's numpy ints under numpy 1's module
    # name, numpy.core.multiarray.scalar; the same file under that name must load.
    import zipfile

    from delt.fkd_labels import read_fkd_batch

    source = cutmix_folder[0] / "epoch_0" / "batch_0.tar"
    renamed = tmp_path / "batch_0.tar"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(renamed, "w") as new:
        for entry in old.infolist():
            data = old.read(entry.filename)
            if entry.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            new.writestr(entry.filename, data)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(renamed)
    assert "numpy.core.multiarray.scalar" in unsafe
    expected = read_fkd_batch(source, 4, 8)
    batch = read_fkd_batch(renamed, 4, 8)
    assert batch.box == expected.box and batch.mix == "cutmix"
    assert all(type(value) is int for value in batch.box)


def test_first_epochs_only_and_eval_asking_more_is_refused(
    tiny_set, cutmix_folder, tmp_path, capsys
):
    out = tmp_path / "one.labels"
    result = _import(tiny_set, cutmix_folder[0], out, epochs=1)
    assert result.epochs == 1 and open_store(out).header["origin"]["folder_epochs"] == EPOCHS
    status, line = _cli_error(
        ["eval", "--distilled", str(tiny_set), "--epochs", "2", "--labels", str(out),
         "--no-progress", "--device", "cpu", "--out", str(tmp_path / "e.json")], capsys,
    )  # fmt: skip
    assert status == 2 and line == (
        f"delt eval: error: --labels {out} holds 1 epochs of FKD labels; --epochs 2 needs more"
    )
    status, line = _cli_error(
        ["import-labels", "--fkd", str(cutmix_folder[0]), "--distilled", str(tiny_set),
         "--epochs", "3", "--out", str(tmp_path / "three.labels")], capsys,
    )  # fmt: skip
    assert status == 2 and line == (
        f"delt import-labels: error: --epochs 3: {cutmix_folder[0]} holds {EPOCHS} epochs"
    )


@pytest.mark.slow
def test_imported_labels_replay_the_same_batches_on_two_ranks_at_any_workers(tiny_set, tmp_path):
    # Batches of 4 over 8 images: each of two ranks trains on its 2 rows of every recorded
    # batch (BatchNorm over the global batch), the one-process numbers up to the order of the
    # sums, and the same numbers with --workers 0 and 1.
    from test_distributed import _ok, _torchrun

    _, labels, info = _set(tiny_set)
    folder = tmp_path / "FKD_cutmix_b4"
    write_fkd_folder(folder, labels, info.num_classes, info.resolution, batch=4)
    store = tmp_path / "b4.labels"
    _import(tiny_set, folder, store)
    one = evaluate(
        EvalConfig(
            distilled=str(tiny_set), epochs=EPOCHS, seeds=(0,), labels=str(store),
            out=str(tmp_path / "one.json"), progress=False,
        )
    )  # fmt: skip
    losses = []
    for workers in ("0", "1"):
        path = tmp_path / f"two-{workers}.json"
        _ok(_torchrun([
            "eval", "--distilled", str(tiny_set), "--epochs", str(EPOCHS), "--seeds", "0",
            "--labels", str(store), "--workers", workers, "--device", "cpu", "--out", str(path),
            "--no-progress",
        ]))  # fmt: skip
        losses.append(json.loads(path.read_text())["seeds"][0]["train_loss"])
    assert losses[0] == losses[1]
    assert losses[0] == pytest.approx(one.seeds[0].train_loss, rel=1e-4)
