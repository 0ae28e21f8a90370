"""delt.relabel and delt.soft_labels: `delt relabel` stores, `delt eval --labels` replays them
(bitwise the online numbers with full fp32 logits on the CPU), refusals, corruption, resume,
top-k reconstruction."""

import json
import math

import pytest
import torch
from conftest import count_calls
from delt.config import ConfigError
from delt.evaluate import EvalConfig, evaluate
from delt.io import IntegrityError
from delt.relabel import RelabelConfig, relabel
from delt.soft_labels import (
    StoreMismatchError,
    compress_logits,
    open_store,
    reconstruct_logits,
)

EPOCHS = 3


def _relabel(folder, out, **overrides):
    values = dict(distilled=str(folder), epochs=EPOCHS, seed=0, out=str(out), progress=False)
    values.update(overrides)
    return relabel(RelabelConfig(**values))


def _eval(folder, out, **overrides):
    values = dict(
        distilled=str(folder), epochs=EPOCHS, seeds=(0,), eval_every=1, progress=False,
        out=str(out),
    )  # fmt: skip
    values.update(overrides)
    return evaluate(EvalConfig(**values))


def _numbers(result):
    return [(s.train_loss, s.curve) for s in result.seeds]


@pytest.fixture(scope="module")
def full_store(tiny_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "full.labels"
    _relabel(tiny_set, out)
    return out


def test_full_fp32_store_gives_the_online_numbers_bitwise(tiny_set, full_store, tmp_path):
    # The online evaluation with per-batch-seeded draws (any --workers N > 0) and the store's,
    # in this process (--workers 0) or in a worker: the same losses and accuracies, bitwise.
    online = _eval(tiny_set, tmp_path / "online.json", workers=1)
    stored = _eval(tiny_set, tmp_path / "stored.json", labels=str(full_store))
    in_worker = _eval(tiny_set, tmp_path / "worker.json", labels=str(full_store), workers=1)
    assert _numbers(stored) == _numbers(online)
    assert _numbers(in_worker) == _numbers(online)
    document = json.loads((tmp_path / "stored.json").read_text())
    assert document["identity"]["labels_sha256"] == open_store(full_store).digest


def test_eval_with_labels_never_runs_the_teacher(tiny_set, full_store, tmp_path, monkeypatch):
    from delt import evaluate as evaluate_module

    calls = []
    original = evaluate_module.EvalContext.from_config.__func__

    def spying(cls, config):
        context = original(cls, config)
        context.teacher.model.register_forward_hook(lambda *a: calls.append(1))
        return context

    monkeypatch.setattr(evaluate_module.EvalContext, "from_config", classmethod(spying))
    _eval(tiny_set, tmp_path / "stored.json", labels=str(full_store), eval_every=EPOCHS)
    assert calls == []


def test_the_store_is_made_once_and_its_size_is_announced(tiny_set, full_store, caplog):
    with caplog.at_level("INFO"):
        again = _relabel(tiny_set, full_store)
    assert again.reused and again.epochs_labelled == 0
    store = open_store(full_store)
    assert store.layout.epochs == EPOCHS and store.layout.rows == 8
    assert full_store.stat().st_size == again.size


def test_a_store_of_another_seed_protocol_or_teacher_is_refused(
    tiny_set, full_store, tmp_path, three_class_teacher
):
    with pytest.raises(StoreMismatchError, match="seed: store 0, this run 1"):
        _eval(tiny_set, tmp_path / "a.json", labels=str(full_store), seeds=(1,))
    with pytest.raises(StoreMismatchError, match="cutmix_beta: store 1.0, this run 0.5"):
        _eval(tiny_set, tmp_path / "a.json", labels=str(full_store), cutmix_beta=0.5)
    with pytest.raises(StoreMismatchError, match="batch_size: store 8, this run 4"):
        _eval(tiny_set, tmp_path / "a.json", labels=str(full_store), batch_size=4)
    with pytest.raises(StoreMismatchError, match="holds 3 epochs"):
        _eval(tiny_set, tmp_path / "a.json", labels=str(full_store), epochs=EPOCHS + 1)
    with pytest.raises(ConfigError, match="one --seeds"):
        _eval(tiny_set, tmp_path / "a.json", labels=str(full_store), seeds=(0, 1))
    with pytest.raises(ConfigError, match="--hard-labels"):
        _eval(tiny_set, tmp_path / "a.json", labels=str(full_store), hard_labels=True)


def test_a_store_of_another_teacher_is_refused(tiny_set, full_store, tmp_path, tiny_teacher):
    from delt.io import torch_save

    # The same architecture and data, another file (one weight changed): another teacher.
    state = torch.load(tiny_teacher.path, weights_only=True)
    key = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
    state["state_dict"][key] = state["state_dict"][key] + 1
    other = tmp_path / "other-teacher.pt"
    torch_save(state, other)
    with pytest.raises(StoreMismatchError, match="teacher_sha256: store SHA-256"):
        _eval(tiny_set, tmp_path / "a.json", labels=str(full_store), teacher=str(other))


def test_a_truncated_or_bit_flipped_store_is_a_one_line_error(full_store, tmp_path):
    data = full_store.read_bytes()
    truncated = tmp_path / "truncated.labels"
    truncated.write_bytes(data[:-100])
    with pytest.raises(IntegrityError, match="truncated"):
        open_store(truncated)
    flipped = tmp_path / "flipped.labels"
    corrupt = bytearray(data)
    corrupt[-5] ^= 0x10  # a bit of the last epoch's block
    flipped.write_bytes(bytes(corrupt))
    with pytest.raises(IntegrityError, match="epoch 3's labels are corrupt"):
        open_store(flipped)
    header = bytearray(data)
    header[40] ^= 0x01  # inside the JSON header
    bad_header = tmp_path / "header.labels"
    bad_header.write_bytes(bytes(header))
    with pytest.raises(IntegrityError, match="header is corrupt"):
        open_store(bad_header)
    not_a_store = tmp_path / "other.labels"
    not_a_store.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a delt label store"):
        open_store(not_a_store)


def test_cli_reports_a_corrupt_store_in_one_line(tiny_set, full_store, tmp_path, capsys):
    from delt.cli import main

    corrupt = bytearray(full_store.read_bytes())
    corrupt[-5] ^= 0x10
    flipped = tmp_path / "flipped.labels"
    flipped.write_bytes(bytes(corrupt))
    status = main([
        "eval", "--distilled", str(tiny_set), "--epochs", str(EPOCHS), "--labels", str(flipped),
        "--out", str(tmp_path / "e.json"), "--no-progress", "--device", "cpu",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1] == (
        f"delt eval: error: --labels {flipped}: epoch 3's labels are corrupt (SHA-256 differs)"
    )


def test_a_killed_relabel_resumes_to_the_same_bytes(tiny_set, full_store, tmp_path, monkeypatch):
    from delt import relabel as relabel_module

    out = tmp_path / "killed.labels"
    calls = count_calls(monkeypatch, relabel_module, "_write_epoch", die_after=2)
    with pytest.raises(KeyboardInterrupt):
        _relabel(tiny_set, out)
    assert len(calls) == 2 and not out.exists()
    calls = count_calls(monkeypatch, relabel_module, "_write_epoch")
    result = _relabel(tiny_set, out)
    assert len(calls) == 1 and result.epochs_labelled == 1  # epochs 1 and 2 were kept
    assert out.read_bytes() == full_store.read_bytes()
    assert not (tmp_path / "killed.labels.partial").exists()
    assert not (tmp_path / "killed.labels.progress.json").exists()


def test_the_cli_makes_the_folder_of_out_and_reports_the_store(tiny_set, full_store, tmp_path):
    from delt.cli import main

    out = tmp_path / "new" / "folder" / "s.labels"
    args = ["relabel", "--distilled", str(tiny_set), "--epochs", str(EPOCHS), "--out", str(out)]
    assert main([*args, "--no-progress", "--device", "cpu"]) == 0
    assert out.read_bytes() == full_store.read_bytes()


def test_another_store_at_out_is_not_overwritten(tiny_set, full_store):
    with pytest.raises(ConfigError, match="holds another store.*seed: store 0, this run 1"):
        _relabel(tiny_set, full_store, seed=1)


def test_top_k_reconstruction_is_fkd_marginal_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(5, 10) * 4
    temperature = 3.0
    arrays = compress_logits(logits, 3, "fp32", temperature)
    rebuilt = reconstruct_logits(arrays["values"], arrays["indices"], arrays["fill"], 10)
    target = (logits / temperature).softmax(1)
    rebuilt_target = (rebuilt / temperature).softmax(1)
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, arrays["indices"], True)
    # The top-k classes keep their probabilities; the others share the rest evenly.
    torch.testing.assert_close(rebuilt_target[kept], target[kept])
    rest = (1 - target[kept].view(5, 3).sum(1, keepdim=True)) / 7
    torch.testing.assert_close(rebuilt_target[~kept].view(5, 7), rest.expand(5, 7))
    assert torch.equal(arrays["indices"], logits.topk(3, dim=1).indices)
    assert math.isfinite(float(arrays["fill"].sum()))


def test_top_k_fp16_store_trains_and_is_tied_to_its_temperature(tiny_set, full_store, tmp_path):
    out = tmp_path / "top2.labels"
    made = _relabel(tiny_set, out, top_k=2, dtype="fp16")
    assert made.size == out.stat().st_size
    store, full = open_store(out), open_store(full_store)
    # Two fp16 logits and their int16 classes per row, and one fill logit (64-byte aligned).
    assert store.layout.arrays["values"][:2] == ("float16", (8, 2))
    assert store.layout.arrays["indices"][:2] == ("int16", (8, 2))
    assert store.layout.arrays["fill"][:2] == ("float16", (8,))
    assert store.layout.top_k == 2 and store.header["storage"]["temperature"] == 20.0
    logits = store.logits(0, 0, slice(None))
    assert logits.shape == (8, 4) and logits.dtype == torch.float32
    # The same batch's two largest logits, in fp16, and their classes, as the full store has them.
    kept, exact = logits.topk(2), full.logits(0, 0, slice(None)).topk(2)
    assert torch.equal(kept.indices, exact.indices)
    torch.testing.assert_close(kept.values, exact.values, rtol=1e-3, atol=1e-3)
    result = _eval(tiny_set, tmp_path / "e.json", labels=str(out))
    assert all(math.isfinite(x) for x in result.seeds[0].train_loss)
    with pytest.raises(StoreMismatchError, match="temperature: store 20.0, this run 4.0"):
        _eval(tiny_set, tmp_path / "e.json", labels=str(out), temperature=4.0)


def test_bn_mode_train_labels_with_batch_statistics(tiny_set, full_store, tmp_path):
    out = tmp_path / "train-bn.labels"
    _relabel(tiny_set, out, bn_mode="train", epochs=1)
    store, reference = open_store(out), open_store(full_store)
    assert store.header["teacher"]["bn_mode"] == "train"
    assert store.protocol == reference.protocol  # the same batches
    assert torch.equal(store.order(0), reference.order(0))
    # Batch statistics instead of running ones: other logits on the very same batch.
    assert not torch.allclose(store.logits(0, 0, slice(None)), reference.logits(0, 0, slice(None)))


def test_a_store_of_the_other_teacher_bn_mode_is_refused(tiny_set, full_store, tmp_path):
    # Batch-statistics labels (--bn-mode train) never train a running-statistics evaluation,
    # nor the reverse (--teacher-batch-stats, e.g. --protocol cvdd's).
    out = tmp_path / "train-bn.labels"
    _relabel(tiny_set, out, bn_mode="train", epochs=1)
    with pytest.raises(StoreMismatchError, match=r"BatchNorm in train mode .*asks for eval mode"):
        _eval(tiny_set, tmp_path / "a.json", labels=str(out), epochs=1)
    with pytest.raises(StoreMismatchError, match=r"BatchNorm in eval mode .*asks for train mode"):
        _eval(tiny_set, tmp_path / "b.json", labels=str(full_store), teacher_batch_stats=True)
    trained = _eval(tiny_set, tmp_path / "c.json", labels=str(out), epochs=1,
                    teacher_batch_stats=True)  # fmt: skip
    assert math.isfinite(trained.seeds[0].train_loss[-1])
    # And relabel names the teacher setting that differs at its --out.
    with pytest.raises(ConfigError, match=r"bn_mode: store 'train', this run 'eval'"):
        _relabel(tiny_set, out, epochs=1)


def test_a_store_of_other_torch_versions_is_said(tiny_set, full_store, tmp_path, monkeypatch,
                                                 caplog):  # fmt: skip
    import delt.soft_labels

    real = delt.soft_labels.versions()
    monkeypatch.setattr(
        delt.soft_labels, "versions", lambda: {**real, "torchvision": "0.1.0"}
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        _eval(tiny_set, tmp_path / "v.json", labels=str(full_store), epochs=1)
    assert f"torchvision {real['torchvision']} -> 0.1.0" in caplog.text
    caplog.clear()
    monkeypatch.setattr(delt.soft_labels, "versions", lambda: real)
    with caplog.at_level("WARNING"):
        _eval(tiny_set, tmp_path / "w.json", labels=str(full_store), epochs=1)
    assert "other versions" not in caplog.text


def test_a_shorter_evaluation_reads_the_first_epochs_of_a_store(tiny_set, full_store, tmp_path):
    short = _eval(tiny_set, tmp_path / "short.json", labels=str(full_store), epochs=2)
    online = _eval(tiny_set, tmp_path / "online.json", epochs=2, workers=1)
    assert _numbers(short) == _numbers(online)


def test_bad_relabel_flags_are_refused(tiny_set, tmp_path):
    # An ensemble's teachers are each one teacher (tests/test_teachers.py has the ensembles).
    own = json.loads((tiny_set / "manifest.json").read_text())["teacher"]["path"]
    with pytest.raises(ConfigError, match="--teachers .*the same teacher"):
        _relabel(tiny_set, tmp_path / "t.labels", teachers=(own,))
    with pytest.raises(ConfigError, match="--top-k 4 keeps every one of the 4 classes"):
        _relabel(tiny_set, tmp_path / "x.labels", top_k=4)


def test_a_store_that_does_not_fit_on_the_disk_is_refused(tiny_set, tmp_path, monkeypatch):
    import shutil

    from delt.runtime import ResourceError

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(ResourceError, match="the store needs .* free"):
        _relabel(tiny_set, tmp_path / "big.labels")
    assert not (tmp_path / "big.labels.partial").exists()


# --------------------------------------------------------------------------------------------
# torchrun: the same store at world size 2, and eval --labels replaying it on two ranks


@pytest.mark.slow
def test_relabel_on_two_ranks_writes_the_one_process_bytes_and_eval_replays_them(
    tiny_set, full_store, tmp_path
):
    from test_distributed import _ok, _torchrun

    out = tmp_path / "two" / "labels.labels"
    out.parent.mkdir()
    result = _ok(_torchrun([
        "relabel", "--distilled", str(tiny_set), "--epochs", str(EPOCHS), "--seed", "0",
        "--out", str(out), "--device", "cpu", "--no-progress",
    ]))  # fmt: skip
    assert "the store takes" in result.stderr
    assert out.read_bytes() == full_store.read_bytes()

    # Two ranks train on the store: each takes its rows of every stored batch (global batch 8,
    # 4 per rank, BatchNorm over the global batch): the one-process numbers up to the order of
    # the sums, whatever --workers.
    one = _eval(tiny_set, tmp_path / "one.json", labels=str(out))
    losses = []
    for workers in ("0", "1"):
        path = tmp_path / f"two-{workers}.json"
        _ok(_torchrun([
            "eval", "--distilled", str(tiny_set), "--epochs", str(EPOCHS), "--seeds", "0",
            "--labels", str(out), "--workers", workers, "--device", "cpu", "--out", str(path),
            "--no-progress",
        ]))  # fmt: skip
        losses.append(json.loads(path.read_text())["seeds"][0]["train_loss"])
    assert losses[0] == losses[1]
    assert losses[0][0] == pytest.approx(one.seeds[0].train_loss[0], rel=1e-4)
