"""delt eval at scale: the set on the host in its stored dtype, --workers, --amp fp16, and
epoch-level resume of a killed run (--checkpoint-every)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from delt.config import ConfigError
from delt.evaluate import EvalConfig, EvalContext, evaluate
from delt.io import torch_load

ROOT = Path(__file__).resolve().parents[1]


def _config(folder, out, **overrides):
    values = dict(
        distilled=str(folder), out=str(out), epochs=3, seeds=(0,), eval_every=1, progress=False,
        device="cpu",
    )  # fmt: skip
    values.update(overrides)
    return EvalConfig(**values)


def _numbers(result):
    return [(s.seed, s.train_loss, s.curve) for s in result.seeds]


def test_the_set_stays_on_the_host_as_stored(tiny_set, tmp_path):
    context = EvalContext.from_config(_config(tiny_set, tmp_path / "e.json"))
    assert context.images.device.type == "cpu" and context.images.dtype == torch.float32
    assert context.workers == 0  # the CPU default: main's random stream


def test_workers_give_the_same_numbers_for_any_count(tiny_set, tmp_path):
    one = evaluate(_config(tiny_set, tmp_path / "one.json", workers=1))
    two = evaluate(_config(tiny_set, tmp_path / "two.json", workers=2))
    assert _numbers(one) == _numbers(two)
    zero = evaluate(_config(tiny_set, tmp_path / "zero.json", workers=0))
    assert _numbers(zero) != _numbers(one)  # another random stream, recorded in the identity
    identity = json.loads((tmp_path / "one.json").read_text())["identity"]["config"]
    assert identity["augmentation"] == "workers: per-batch seeds"
    assert "augmentation" not in json.loads((tmp_path / "zero.json").read_text())["identity"]


def test_fp16_trains_with_a_gradient_scaler(tiny_set, tmp_path):
    result = evaluate(_config(tiny_set, tmp_path / "fp16.json", amp="fp16", epochs=2))
    assert all(torch.isfinite(torch.tensor(s.train_loss)).all() for s in result.seeds)
    context = EvalContext.from_config(_config(tiny_set, tmp_path / "x.json", amp="fp16"))
    trainer = context.make_trainer(0)
    assert trainer.scaler is not None and trainer.state_dict()["scaler"] is not None


@pytest.mark.parametrize("overrides", [{"checkpoint_every": 0}, {"workers": -1}])
def test_bad_values(tiny_set, tmp_path, overrides):
    with pytest.raises(ConfigError, match="must be an integer"):
        _config(tiny_set, tmp_path / "e.json", **overrides)


def test_an_interrupted_seed_resumes_where_it_was(tiny_set, tmp_path, monkeypatch):
    from delt.student import StudentTrainer

    whole = evaluate(_config(tiny_set, tmp_path / "whole.json", epochs=6, eval_every=2))
    calls = {"epochs": 0}
    train_epoch = StudentTrainer.train_epoch

    def interrupted(self, images, labels):
        if calls["epochs"] == 5:
            raise KeyboardInterrupt
        calls["epochs"] += 1
        return train_epoch(self, images, labels)

    monkeypatch.setattr(StudentTrainer, "train_epoch", interrupted)
    config = _config(tiny_set, tmp_path / "part.json", epochs=6, eval_every=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(config)
    state = torch_load(config.seed_checkpoint_path(0))
    assert state["trainer"]["epochs_done"] == 4 and len(state["losses"]) == 4
    monkeypatch.setattr(StudentTrainer, "train_epoch", train_epoch)
    resumed = evaluate(config)
    assert _numbers(resumed) == _numbers(whole)
    assert not config.seed_checkpoint_path(0).exists()


def _eval_command(tiny_set, out, epochs):
    return [
        sys.executable, "-m", "delt", "eval", "--distilled", str(tiny_set), "--out", str(out),
        "--epochs", str(epochs), "--eval-every", "20", "--checkpoint-every", "5", "--seeds", "0",
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip


def test_a_killed_run_resumes_mid_seed_with_the_same_result(tiny_set, tmp_path, num_threads):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    epochs = 60
    whole = tmp_path / "whole.json"
    num_threads(1)  # the subprocesses' count: the uninterrupted run here gives their numbers
    evaluate(
        _config(tiny_set, whole, epochs=epochs, eval_every=20, checkpoint_every=5, seeds=(0,))
    )
    killed = tmp_path / "killed.json"
    state = tmp_path / "killed-checkpoints" / "seed-0.pt"
    process = subprocess.Popen(
        _eval_command(tiny_set, killed, epochs), env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not killed.exists()
    done = torch_load(state)["trainer"]["epochs_done"]
    assert 0 < done < epochs
    run = subprocess.run(
        _eval_command(tiny_set, killed, epochs), env=env, cwd=tmp_path, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    assert f"resumes after epoch {done}" in run.stderr or "resumes after epoch" in run.stderr
    saved, again = (json.loads(path.read_text())["seeds"][0] for path in (whole, killed))
    assert again["train_loss"] == saved["train_loss"] and again["curve"] == saved["curve"]
    assert again["final_accuracy"] == saved["final_accuracy"]
