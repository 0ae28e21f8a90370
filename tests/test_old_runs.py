"""Runs written by main a713465 resume, or are reused without recomputation, with today's code.

``fixtures/a713465/`` holds the output folders of the commands in its ``fixture.json``, written
by that commit's ``delt`` (``fixtures/a713465/make.py``; never regenerate them with later code):
finished ``delt recover`` runs (delt, pdd), killed ones, a ``delt distill`` run, and the
``eval.json`` / ``eval-stagewise.json`` of ``delt eval``. Each test copies the folder into
``tmp_path`` and re-runs a recorded command in-process (``delt.cli.main``):

- a finished run is reused: no optimizer is made and no convolution or linear layer runs (the
  teacher's, a student's or the feature model's forward raises :class:`Recomputed`), and every
  file keeps its bytes; an eval file may be rewritten in its metadata only, with its accuracies;
- a killed recovery resumes: its finished chunks are neither optimized again nor rewritten, and
  its ``distilled.pt`` is bitwise its uninterrupted twin's (on the platform that wrote the
  fixture: one torch build and CPU kernel family, as ``test_recover_reference.py``).
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import count_calls
from delt.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "a713465"
RECORD = json.loads((FIXTURE / "fixture.json").read_text())
RESULT_KEYS = ("seeds", "other_seeds", "best", "final", "accuracy_mean", "accuracy_std")


class Recomputed(BaseException):
    """Raised by a forbidden computation; a BaseException, so that the CLI does not turn it
    into an exit status."""


def _argv(name: str) -> list[str]:
    command = RECORD["commands"][name]["command"].split()
    assert command[0] == "delt"
    return command[1:]


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _same_platform() -> bool:
    platform = RECORD["platform"]
    return (
        platform["torch"] == torch.__version__
        and platform["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    )


@pytest.fixture
def old_runs(tmp_path, monkeypatch, num_threads):
    """A writable copy of the fixture folder, the working directory (the runs record relative
    paths)."""
    copy = tmp_path / "a713465"
    shutil.copytree(FIXTURE, copy, ignore=shutil.ignore_patterns("make.py", "__pycache__"))
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    monkeypatch.chdir(copy)
    return copy


def _forbid_computation(monkeypatch) -> None:
    def refuse(what):
        def refused(*args, **kwargs):
            raise Recomputed(f"{what}: a run of main a713465 was computed again, not reused")

        return refused

    for optimizer in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD):
        monkeypatch.setattr(optimizer, "__init__", refuse(f"{optimizer.__name__}()"))
    for layer in (torch.nn.Conv2d, torch.nn.Linear):
        monkeypatch.setattr(layer, "forward", refuse(f"{layer.__name__}.forward"))


def _assert_unchanged(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    """Every file keeps its bytes, except an eval file's metadata (its results stay)."""
    assert sorted(after) == sorted(before)
    for name, data in before.items():
        if data == after[name]:
            continue
        assert Path(name).name.startswith("eval") and name.endswith(".json"), f"{name} rewritten"
        old, new = json.loads(data), json.loads(after[name])
        for key in (*RESULT_KEYS, "plain"):
            assert new.get(key) == old.get(key), f"{name}: {key} changed"


@pytest.mark.parametrize("name", ["recover-delt", "recover-pdd"])
def test_a_finished_recovery_is_reused(old_runs, monkeypatch, name):
    before = _files(old_runs)
    _forbid_computation(monkeypatch)
    assert main(_argv(name)) == 0
    _assert_unchanged(before, _files(old_runs))


def test_a_finished_distill_run_is_reused(old_runs, monkeypatch, capsys):
    before = _files(old_runs)
    _forbid_computation(monkeypatch)
    assert main(_argv("distill-delt")) == 0
    _assert_unchanged(before, _files(old_runs))
    summary = capsys.readouterr().out.split("-\n", 1)[1].splitlines()
    steps = [line for line in summary if not line.startswith("report:")]
    assert [line.split()[0] for line in steps] == ["teacher", "select", "recover", "eval",
                                                   "diversity"]  # fmt: skip
    assert all(line.endswith("(cached)") for line in steps), steps


@pytest.mark.parametrize(
    "name, results",
    [("eval", "recover-delt/eval.json"), ("eval-stagewise", "recover-pdd/eval-stagewise.json")],
)
def test_a_finished_evaluation_is_reused(old_runs, monkeypatch, capsys, name, results):
    saved = json.loads((old_runs / results).read_text())
    before = _files(old_runs)
    _forbid_computation(monkeypatch)
    assert main(_argv(name)) == 0
    assert "(cached)" in capsys.readouterr().out
    _assert_unchanged(before, _files(old_runs))
    document = json.loads((old_runs / results).read_text())
    assert document["accuracy_mean"] == saved["accuracy_mean"] is not None
    assert [s["seed"] for s in document["seeds"]] == [s["seed"] for s in saved["seeds"]]


KILLED = ["recover-delt-killed", "recover-pdd-killed"]


def _optimized_chunks(name: str, adams: list) -> None:
    """One Adam per chunk (the papers' loop): only the chunk the kill interrupted and the later
    ones were optimized. (Counted at ``Adam.__init__``, however the code names the class.)"""
    record = RECORD["commands"][name]
    twin = Path(record["twin"])
    total = len(list((twin / "images").glob("*/*")))
    per_chunk = 4  # --batch-size 4 in both commands
    assert len(adams) == total // per_chunk - record["killed_after_chunks"]


def _assert_twins_bytes(name: str) -> None:
    record = RECORD["commands"][name]
    resumed = torch.load(Path(name) / "distilled.pt", weights_only=True)
    expected = torch.load(Path(record["twin"]) / "distilled.pt", weights_only=True)
    assert torch.equal(resumed["labels"], expected["labels"])
    if not _same_platform():
        pytest.skip(
            f"bitwise equality holds on the fixture's platform {RECORD['platform']}, not on "
            f"torch {torch.__version__} / {torch.backends.cpu.get_cpu_capability()}"
        )
    from delt.io import sha256_file

    assert sha256_file(Path(name) / "distilled.pt") == record["twin_distilled_sha256"]
    assert sha256_file(Path(record["twin"]) / "distilled.pt") == record["twin_distilled_sha256"]


@pytest.mark.parametrize("name", KILLED)
def test_a_killed_recovery_resumes_without_rewriting_its_chunks(old_runs, monkeypatch, name):
    # --keep-chunks (not part of a run's identity) keeps the chunks to check.
    folder = old_runs / name
    # The finished chunks; pdd's finished first stage also left U_1 as a set (resume state,
    # which a resume may write again, with the same bytes).
    chunks = sorted(folder.rglob("chunks/*.pt"))
    assert len(chunks) == RECORD["commands"][name]["killed_after_chunks"]
    before = {
        path: (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns) for path in chunks
    }
    unions = {path: path.read_bytes() for path in folder.glob("stages/*/distilled.pt")}
    adams = count_calls(monkeypatch, torch.optim.Adam, "__init__")
    assert main([*_argv(name), "--keep-chunks"]) == 0
    _optimized_chunks(name, adams)
    for path, (data, inode, mtime) in before.items():
        assert path.read_bytes() == data, f"{path} changed"
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime), f"{path} rewritten"
    for path, data in unions.items():
        assert path.read_bytes() == data, f"{path} changed"
    _assert_twins_bytes(name)


@pytest.mark.parametrize("name", KILLED)
def test_a_killed_recovery_resumes_to_its_twins_bytes(old_runs, monkeypatch, name):
    # The very command that was killed.
    adams = count_calls(monkeypatch, torch.optim.Adam, "__init__")
    assert main(_argv(name)) == 0
    _optimized_chunks(name, adams)
    _assert_twins_bytes(name)
