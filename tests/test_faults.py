"""Fault injection: `delt recover` and `delt distill` SIGKILLed at their write points resume to
the bytes of an uninterrupted run; two writers of one --out cannot mix a set.

The kills use io's hook (``DELT_FAULT_KILL_AT_WRITE=k``: SIGKILL at the k-th atomic write, the
temporary file written, the destination not yet replaced); ``DELT_FAULT_LOG`` lists the write
points of an uninterrupted run. The default run (CI) kills at a few representative points of
each command; ``DELT_EXHAUSTIVE_FAULTS=1 pytest tests/test_faults.py -m slow`` kills at every one
(several minutes; `make test` runs slow tests, so CI would otherwise too).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SYNTHETIC
from delt.cli import main
from delt.lock import output_lock

RECOVER_FLAGS = [
    "--ipc", "2", "--method", "cda", "--iterations", "4", "--batch-size", "4", "--device", "cpu",
    "--no-progress",
]  # fmt: skip
DISTILL_FLAGS = [
    "--method", "delt", "--ipc", "2", "--dataset", SYNTHETIC, "--arch", "convnet1", "--width",
    "4", "--teacher-epochs", "1", "--iterations", "4", "--round-iterations", "2",
    "--recover-batch-size", "4", "--eval-epochs", "2", "--eval-every", "1", "--device", "cpu",
    "--no-progress",
]  # fmt: skip


def exhaustive(test):
    skip = pytest.mark.skipif(
        not os.environ.get("DELT_EXHAUSTIVE_FAULTS"), reason="set DELT_EXHAUSTIVE_FAULTS=1"
    )
    return pytest.mark.slow(skip(test))


def _delt(args, cwd, **env):
    """``python -m delt ARGS`` in a fresh process at one thread (as the in-process resumes)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "delt", *args], cwd=cwd, env=environment, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip


def _write_points(args, cwd, out):
    """Runs ``args`` uninterrupted, logging its atomic writes: the destinations, in order."""
    log = cwd / f"{out.name}.writes"
    result = _delt(args, cwd, DELT_FAULT_LOG=str(log))
    assert result.returncode == 0, result.stderr
    return [Path(line).relative_to(out) for line in log.read_text().splitlines()]


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _kill_and_resume(args, cwd, out, point, in_process=True):
    """Kills ``args`` at write ``point`` (1-based), checks what it left, resumes (in this
    process, or in a fresh one as the reference ran)."""
    killed = _delt(args, cwd, DELT_FAULT_KILL_AT_WRITE=str(point))
    assert killed.returncode == -9, killed.stderr  # SIGKILL: no cleanup code ran
    assert any(name.endswith(".tmp") for name in _files(out))  # the write it died in
    assert (out / ".lock").is_file()  # left by the killed process, its flock gone
    if in_process:
        torch.set_num_threads(1)
        assert main(args) == 0
    else:
        resumed = _delt(args, cwd)
        assert resumed.returncode == 0, resumed.stderr
    assert not [name for name in _files(out) if name.endswith(".tmp") or name.endswith(".lock")]


def _same_recovery(folder, reference):
    assert _files(folder) == _files(reference)
    for name in _files(reference):
        if name in ("manifest.json",):
            continue
        if name.startswith("chunks/"):
            saved, expected = (torch.load(d / name, weights_only=True) for d in (folder, reference))
            assert torch.equal(saved["images"], expected["images"]), name
            assert saved["identity"] == expected["identity"], name
            continue
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    manifest, expected = (
        json.loads((directory / "manifest.json").read_text()) for directory in (folder, reference)
    )
    for document in (manifest, expected):
        # Optimization seconds of chunks made by different processes.
        document.pop("synthesis_seconds"), document["config"].pop("out")  # and the folder
    assert manifest == expected


def _recover_args(teacher, out):
    return ["recover", "--teacher", str(teacher), "--out", str(out), *RECOVER_FLAGS]


def _check_recover_kills(tiny_teacher, tmp_path, num_threads, choose):
    num_threads(1)
    reference = tmp_path / "reference"
    points = _write_points(_recover_args(tiny_teacher.path, reference), tmp_path, reference)
    names = [str(p) for p in points]
    assert names[0] == "run.json" and names[-2:] == ["distilled.pt", "manifest.json"]
    assert sum(name.startswith("chunks/") for name in names) == 2
    assert sum(name.startswith("images/") for name in names) == 8
    for point in choose(names):
        out = tmp_path / f"killed-{point}"
        _kill_and_resume(_recover_args(tiny_teacher.path, out), tmp_path, out, point)
        _same_recovery(out, reference)


def test_recover_killed_at_representative_writes_resumes_bitwise(
    tiny_teacher, tmp_path, num_threads
):
    # The second chunk, an image, the manifest (the last write).
    def choose(names):
        return [3, names.index("images/001/000.png") + 1, len(names)]

    _check_recover_kills(tiny_teacher, tmp_path, num_threads, choose)


@exhaustive
def test_recover_killed_at_every_write_resumes_bitwise(tiny_teacher, tmp_path, num_threads):
    _check_recover_kills(
        tiny_teacher, tmp_path, num_threads, lambda names: range(1, len(names) + 1)
    )


def _same_values(value, expected):
    """Nested dicts/lists of tensors and plain values, equal to the bit."""
    if isinstance(expected, torch.Tensor):
        return isinstance(value, torch.Tensor) and torch.equal(value, expected)
    if isinstance(expected, dict):
        return value.keys() == expected.keys() and all(
            _same_values(value[k], expected[k]) for k in expected
        )
    if isinstance(expected, list | tuple):
        return len(value) == len(expected) and all(map(_same_values, value, expected))
    return value == expected


def _same_distill(folder, reference):
    assert _files(folder) == _files(reference)
    # teacher.pt holds its training seconds: its weights must be the same.
    weights = (torch.load(d / "teacher/teacher.pt", weights_only=True) for d in (folder, reference))
    state, expected_state = (payload["state_dict"] for payload in weights)
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[key], expected_state[key]) for key in state)
    identical = ["distilled/distilled.pt", "grid.png"]
    if (reference / "select").is_dir():  # a method that starts from real images
        identical.append("select/ranking.csv")
    if (reference / "stats.pt").is_file():  # per-class matching: the statistics of delt stats
        # (they name their teacher's SHA-256, which differs with the teacher's seconds)
        stats, expected = (
            torch.load(d / "stats.pt", weights_only=True) for d in (folder, reference)
        )
        for payload in (stats, expected):
            payload.pop("teacher_sha256"), payload.pop("digest")
        assert _same_values(stats, expected)
    identical += [name for name in _files(reference) if name.startswith("distilled/images/")]
    for name in identical:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name

    def read(name):
        return json.loads((folder / name).read_text()), json.loads((reference / name).read_text())

    if (reference / "select").is_dir():
        selection, expected = read("select/selection.json")
        assert selection["classes"] == expected["classes"]
    report, expected = read("report.json")
    report.pop("synthesis_seconds"), expected.pop("synthesis_seconds")
    assert report == expected
    evaluation, expected = read("distilled/eval.json")
    keys = ("seed", "best_accuracy", "best_epoch", "final_accuracy", "curve", "train_loss")
    for seed, reference_seed in zip(evaluation["seeds"], expected["seeds"], strict=True):
        assert {k: seed.get(k) for k in keys} == {k: reference_seed.get(k) for k in keys}
    diversity, expected = read("distilled/diversity.json")
    assert diversity["per_class"] == expected["per_class"]


def _distill_args(out):
    return ["distill", "--out", str(out), *DISTILL_FLAGS]


def _check_distill_kills(tmp_path, num_threads, choose):
    num_threads(1)
    reference = tmp_path / "reference"
    names = [str(p) for p in _write_points(_distill_args(reference), tmp_path, reference)]
    for name in ("teacher/teacher.pt", "select/selection.json", "distilled/distilled.pt",
                 "distilled/eval.json", "distilled/diversity.json", "report.md"):  # fmt: skip
        assert name in names
    for point in choose(names):
        out = tmp_path / f"killed-{point}"
        _kill_and_resume(_distill_args(out), tmp_path, out, point)
        _same_distill(out, reference)


def test_distill_killed_at_representative_writes_resumes_bitwise(tmp_path, num_threads):
    def choose(names):
        picks = ("teacher/teacher.pt", "distilled/eval.json")
        return [names.index(name) + 1 for name in picks] + [len(names)]

    _check_distill_kills(tmp_path, num_threads, choose)


@exhaustive
def test_distill_killed_at_every_write_resumes_bitwise(tmp_path, num_threads):
    _check_distill_kills(tmp_path, num_threads, lambda names: range(1, len(names) + 1))


def test_two_recoveries_into_one_out_cannot_mix(tiny_teacher, tmp_path, num_threads):
    # Issue 18's reproduce line: `delt recover $A --out X & delt recover $A --lr 0.1 --out X`.
    num_threads(1)
    out = tmp_path / "X"
    # Long enough for the two to overlap; the chunks are kept to check each of them.
    flags = ["--iterations", "60", "--keep-chunks"]
    base = [*_recover_args(tiny_teacher.path, out), *flags]
    args = {lr: [*base, "--lr", lr] for lr in ("0.25", "0.1")}
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = {
        lr: subprocess.Popen(
            [sys.executable, "-m", "delt", *command],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for lr, command in args.items()
    }
    results = {lr: (p.wait(timeout=600), p.stderr.read()) for lr, p in processes.items()}
    survivors = [lr for lr, (rc, _) in results.items() if rc == 0]
    assert len(survivors) == 1, results
    (loser,) = set(results) - set(survivors)
    rc, stderr = results[loser]
    assert rc == 2
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("delt recover: error: --out ")
    assert "is being written by another process" in line or "another configuration" in line
    # The survivor's set is pure: the very set of an uninterrupted run with its flags alone.
    reference = tmp_path / "reference"
    reference_args = [a if a != str(out) else str(reference) for a in args[survivors[0]]]
    assert main(reference_args) == 0
    assert (out / "distilled.pt").read_bytes() == (reference / "distilled.pt").read_bytes()
    for chunk in (out / "chunks").iterdir():
        assert chunk.read_bytes() != b""
        saved = torch.load(chunk, weights_only=True)
        # (An identity leaves out a field at its default: --lr 0.25; delt.identity.)
        assert json.loads(saved["identity"])["config"].get("lr", 0.25) == float(survivors[0])
    assert json.loads((out / "manifest.json").read_text())["config"]["lr"] == float(survivors[0])
    assert json.loads((out / "run.json").read_text())["config"].get("lr", 0.25) == float(
        survivors[0]
    )


def test_a_second_writer_is_refused_at_once_by_the_cli(tiny_teacher, tmp_path):
    out = tmp_path / "X"
    with output_lock(out):  # this process is the first writer
        result = _delt(_recover_args(tiny_teacher.path, out), tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"delt recover: error: --out {out} is being written by another process")
    assert f"pid {os.getpid()}" in line
    assert _files(out) == []  # it wrote nothing


def test_distill_with_class_matching_killed_mid_recovery_resumes_bitwise(tmp_path, num_threads):
    # Per-class matching (WMDD's --match class, half global) through delt distill, with its own
    # `delt stats` step: killed while writing the statistics, mid-recovery (at the third of
    # four chunks), and at the last write, each resumed to the uninterrupted run's bytes.
    num_threads(1)
    flags = [
        "--method", "sre2l", "--ipc", "2", "--dataset", SYNTHETIC, "--arch", "convnet1",
        "--width", "4", "--teacher-epochs", "1", "--iterations", "4", "--recover-batch-size",
        "2", "--eval-epochs", "2", "--eval-every", "1", "--device", "cpu", "--no-progress",
        "--match", "class", "--match-class-weight", "0.5",
    ]  # fmt: skip

    def args(out):
        return ["distill", "--out", str(out), *flags]

    reference = tmp_path / "reference"
    names = [str(p) for p in _write_points(args(reference), tmp_path, reference)]
    chunks = [index for index, name in enumerate(names, 1) if "/chunks/" in name]
    assert "stats.pt" in names and len(chunks) == 4  # 4 classes x IPC 2 in chunks of 2
    for point in (names.index("stats.pt") + 1, chunks[2], len(names)):
        out = tmp_path / f"killed-{point}"
        _kill_and_resume(args(out), tmp_path, out, point)
        _same_distill(out, reference)
