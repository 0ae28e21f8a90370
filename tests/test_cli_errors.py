"""delt.cli: every failure a user can cause is one line naming the file or flag, no traceback.

Corrupted inputs of every kind the CLI reads (teacher checkpoint, selection.json, recovery
chunk, distilled.pt, manifest.json), output paths that cannot be written (checked before any
work), a full disk and read-only media (on a small tmpfs, when the tests run as root), sizes
that cannot fit in memory, and the fixed, recorded thread count.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import SYNTHETIC
from delt.cli import main
from delt.demo import DemoConfig
from delt.evaluate import EvalContext
from delt.runtime import DEFAULT_THREADS

# Any sign that torch's own message got through: its advice must never reach the user.
TORCH_ADVICE = ("weights_only=False", "`weights_only` set to `False`", "likely succeed")


def run_cli(capsys, argv):
    """``main(argv)``: (status, the one error line, all of stderr)."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("delt ")]
    return status, lines, err


def assert_one_line_error(capsys, argv, *expected):
    status, lines, err = run_cli(capsys, argv)
    assert status != 0
    assert len(lines) == 1, err
    assert lines[0].startswith(f"delt {argv[0]}: error: "), err
    for text in expected:
        assert str(text) in lines[0], lines[0]
    assert "Traceback" not in err
    for advice in TORCH_ADVICE:
        assert advice not in err
    return lines[0]


class Foreign:
    """Stands for any class from elsewhere: ``torch.save`` pickles a reference to it."""

    def __init__(self):
        self.value = 1


class RunsCode:
    """A malicious pickle: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# Truncations: empty, inside the zip's first header, a third, half, inside the zip's end
# record, all but the last byte.
TRUNCATIONS = {
    "truncated to 0 bytes": lambda n: 0,
    "truncated to 1 byte": lambda n: 1,
    "truncated to 64 bytes": lambda n: 64,
    "truncated to a third": lambda n: n // 3,
    "truncated to half": lambda n: n // 2,
    "truncated by 22 bytes": lambda n: n - 22,
    "truncated by 1 byte": lambda n: n - 1,
}


def binary_corruptions(data: bytes, marker: Path) -> dict[str, bytes]:
    """Damaged versions of a torch file's bytes: truncations at several offsets, garbage of
    the same length, foreign and malicious pickles, a plain pickle, a zip of other files."""
    cases = {name: data[: offset(len(data))] for name, offset in TRUNCATIONS.items()}
    generator = torch.Generator().manual_seed(0)
    garbage = torch.randint(0, 256, (len(data),), dtype=torch.uint8, generator=generator)
    cases["garbage"] = bytes(garbage.tolist())
    cases["foreign pickle"] = _torch_bytes({"state_dict": Foreign()})
    cases["malicious pickle"] = _torch_bytes({"images": RunsCode(marker)})
    cases["plain pickle"] = pickle.dumps({"format": 3})
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("notes/readme.txt", "not a torch file")
    cases["zip of other files"] = archive.getvalue()
    cases["a torch file of something else"] = _torch_bytes({"x": torch.zeros(2)})
    return cases


def json_corruptions(data: bytes) -> dict[str, bytes]:
    cases = {
        "truncated to 0 bytes": b"",
        "truncated to 1 byte": data[:1],
        "truncated to half": data[: len(data) // 2],
        "truncated by 2 bytes": data[:-2],
        "garbage": b"\xff\xfe\x00garbage\x80",
        "torch file": _torch_bytes({"x": torch.zeros(2)}),
        "other JSON": b'{"classes": 5, "dataset": []}',
        "a list": b"[1, 2, 3]",
    }
    return cases


BINARY_CASES = sorted(binary_corruptions(b"x" * 2000, Path("unused")))
JSON_CASES = sorted(json_corruptions(b"{}"))


# --------------------------------------------------------------------------------------------
# Corrupted inputs


@pytest.mark.parametrize("case", BINARY_CASES)
def test_corrupt_teacher_checkpoint(tmp_path, capsys, tiny_teacher, case):
    marker = tmp_path / "pwned"
    damaged = binary_corruptions(tiny_teacher.path.read_bytes(), marker)[case]
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(damaged)
    argv = ["select", "--teacher", bad, "--ipc", 2, "--out", tmp_path / "s", "--no-progress"]
    assert_one_line_error(capsys, argv, bad, "delt checkpoint")
    assert not marker.exists()  # the malicious pickle did not run
    assert not (tmp_path / "s").exists()  # refused before any work


@pytest.mark.parametrize("case", JSON_CASES)
def test_corrupt_selection(tmp_path, capsys, tiny_teacher, tiny_selection, case):
    selection = tmp_path / "select"
    shutil.copytree(tiny_selection, selection)
    path = selection / "selection.json"
    path.write_bytes(json_corruptions(path.read_bytes())[case])
    argv = [
        "recover", "--teacher", tiny_teacher.path, "--ipc", 2, "--out", tmp_path / "r",
        "--selection", selection, "--iterations", 2, "--round-iterations", 1, "--no-progress",
    ]  # fmt: skip
    assert_one_line_error(capsys, argv, path, "selection")
    assert not (tmp_path / "r" / "chunks").exists()


def _copy_set(tiny_set, destination):
    shutil.copytree(tiny_set, destination)
    return destination


# The flags tiny_set (conftest) was made with: a resume must repeat them.
def _recover_argv(teacher, out):
    return [
        "recover", "--teacher", teacher, "--ipc", 2, "--out", out, "--method", "cda",
        "--iterations", 4, "--no-progress",
    ]  # fmt: skip


@pytest.mark.parametrize("case", BINARY_CASES)
def test_corrupt_chunk(tmp_path, capsys, tiny_teacher, tiny_set, case):
    folder = _copy_set(tiny_set, tmp_path / "set")
    (folder / "distilled.pt").unlink()  # an unfinished run, resumed from its chunks
    chunk = sorted((folder / "chunks").iterdir())[0]
    chunk.write_bytes(binary_corruptions(chunk.read_bytes(), tmp_path / "pwned")[case])
    line = assert_one_line_error(
        capsys, _recover_argv(tiny_teacher.path, folder), chunk, "recovery chunk"
    )
    assert "delete it" in line
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("digest", [True, False], ids=["digest", "no-digest"])
@pytest.mark.parametrize("command", ["eval", "diversity"])
@pytest.mark.parametrize("case", BINARY_CASES)
def test_corrupt_distilled_set(tmp_path, capsys, tiny_set, case, command, digest):
    folder = _copy_set(tiny_set, tmp_path / "set")
    path = folder / "distilled.pt"
    path.write_bytes(binary_corruptions(path.read_bytes(), tmp_path / "pwned")[case])
    if not digest:  # a set written before manifests recorded distilled.pt's SHA-256
        manifest = json.loads((folder / "manifest.json").read_text())
        del manifest["distilled_sha256"]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    argv = [command, "--distilled", folder]
    if command == "eval":
        argv += ["--epochs", 1, "--no-progress"]
    # With the digest the change is caught before the file is read; without it, by the reader.
    assert_one_line_error(capsys, argv, path, "SHA-256" if digest else "distilled set")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", ["truncated to 1 byte", "garbage", "a list", "other JSON"])
def test_corrupt_manifest(tmp_path, capsys, tiny_set, case):
    folder = _copy_set(tiny_set, tmp_path / "set")
    path = folder / "manifest.json"
    path.write_bytes(json_corruptions(path.read_bytes())[case])
    assert_one_line_error(capsys, ["eval", "--distilled", folder, "--epochs", 1], path)


def test_traceback_only_with_verbose(tmp_path, tiny_teacher):
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(tiny_teacher.path.read_bytes()[:100])
    argv = ["select", "--teacher", str(bad), "--ipc", "2", "--out", str(tmp_path / "s")]

    def run(*flags):
        return subprocess.run(
            [sys.executable, "-m", "delt", *flags, *argv], capture_output=True, text=True,
            cwd=tmp_path,
        )  # fmt: skip

    quiet, verbose = run(), run("-v")
    assert quiet.returncode == verbose.returncode == 2
    assert quiet.stderr.strip().splitlines() == [
        f"delt select: error: {bad}: not a readable delt checkpoint (delt-checkpoint-v1, as "
        "`delt teacher` writes): it is truncated, corrupt, or not a torch file"
    ]
    assert "Traceback" in verbose.stderr and "FileFormatError" in verbose.stderr


def test_internal_errors_are_one_line_too(tmp_path, capsys, monkeypatch):
    import delt.cli

    def broken(config):
        raise KeyError(101)

    command = delt.cli.COMMANDS["teacher"]
    monkeypatch.setitem(
        delt.cli.COMMANDS, "teacher", delt.cli.Command(command.help, command.config, broken)
    )
    argv = ["teacher", "--out", tmp_path / "t"]
    message = "internal error: KeyError: 101 (run `delt -v ...` for the traceback)"
    assert run_cli(capsys, argv)[:2] == (1, [f"delt teacher: error: {message}"])
    status, lines, err = run_cli(capsys, ["-v", *argv])
    assert status == 1 and "Traceback" in err and "KeyError" in lines[0]


def test_no_advice_to_turn_weights_only_off_anywhere():
    # README, docs, sources, messages: the only safe advice is none.
    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *root.glob("*.md"), *(root / "python").rglob("*.py")]
    files += [*(root / "delt_ext").rglob("*.py"), *(root / "benchmarks").rglob("*.md")]
    for path in files:
        text = path.read_text(errors="replace")
        assert "weights_only=False" not in text, path
        assert "weights_only = False" not in text, path


# --------------------------------------------------------------------------------------------
# Output paths, checked before any work


def _no_training(monkeypatch):
    def refuse(self, seed):
        raise AssertionError("a student was trained before the output path was checked")

    monkeypatch.setattr(EvalContext, "run_seed", refuse)


def test_out_that_is_a_file(tmp_path, capsys, tiny_teacher, monkeypatch):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    teacher = ["teacher", "--out", taken, "--dataset", SYNTHETIC, "--arch", "convnet1"]
    assert_one_line_error(capsys, teacher, f"--out {taken}: exists and is not a folder")
    below = taken / "run"
    assert_one_line_error(
        capsys, _recover_argv(tiny_teacher.path, below), f"{taken} is a file, not a folder"
    )
    report = ["report", "--runs", tmp_path, "--out", below / "chart.png"]
    assert_one_line_error(capsys, report, f"--out {below / 'chart.png'}")
    assert taken.read_text() == "a file"


def test_distill_refuses_another_methods_flag_by_name(tmp_path, capsys, tiny_teacher):
    # pdd's flags on delt, checked before any work: nothing is written.
    out = tmp_path / "run"
    argv = ["distill", "--method", "delt", "--ipc", 2, "--out", out, "--dataset", SYNTHETIC,
            "--teacher", tiny_teacher.path, "--stage-teachers", "checkpoints"]  # fmt: skip
    assert_one_line_error(capsys, argv, "--stage-teachers applies to --method pdd, not delt")
    assert not out.exists()


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_eval_checks_out_before_training(tmp_path, capsys, tiny_set, monkeypatch, where):
    _no_training(monkeypatch)
    if where == "a folder":
        out = tmp_path / "results"
        out.mkdir()
        expected = "is a folder, expected a file path"
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "eval.json"
        expected = "is a file, not a folder"
    argv = ["eval", "--distilled", tiny_set, "--epochs", 1, "--out", out, "--no-progress"]
    assert_one_line_error(capsys, argv, f"--out {out}", expected)


# --------------------------------------------------------------------------------------------
# Read-only media and a full disk: a small tmpfs, when the tests run as root


class Tmpfs:
    def __init__(self, path: Path):
        self.path = path

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)

    def fill(self) -> Path:
        """Writes a file until the disk is full; returns it (delete it to free the space)."""
        filler = self.path / "filler"
        descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            for size in (65536, 4096, 1):
                try:
                    while os.write(descriptor, b"\0" * size):
                        pass
                except OSError:
                    pass
        finally:
            os.close(descriptor)
        return filler


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs at ``tmp_path/mnt`` (root only; skipped where mounting is not allowed)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield Tmpfs(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_read_only_out_is_refused_before_any_work(tmpfs, capsys, tiny_teacher):
    tmpfs.remount("ro")
    out = tmpfs.path / "run"
    assert_one_line_error(
        capsys, _recover_argv(tiny_teacher.path, out), f"--out {out}", "read-only"
    )
    teacher = ["teacher", "--out", out, "--dataset", SYNTHETIC, "--arch", "convnet1"]
    assert_one_line_error(capsys, teacher, "read-only")


def test_adding_a_seed_on_read_only_media(tmpfs, capsys, tiny_set, monkeypatch):
    folder = _copy_set(tiny_set, tmpfs.path / "set")
    eval_argv = ["eval", "--distilled", folder, "--epochs", 1, "--no-progress"]
    assert run_cli(capsys, [*eval_argv, "--seeds", 0])[0] == 0
    before = _digests(folder)
    tmpfs.remount("ro")
    _no_training(monkeypatch)
    assert_one_line_error(
        capsys, [*eval_argv, "--seeds", "0,1"], f"--distilled {folder / 'eval.json'}", "read-only"
    )
    # The finished seed needs no write: read-only media are fine.
    assert run_cli(capsys, [*eval_argv, "--seeds", 0])[0] == 0
    assert _digests(folder) == before


def test_full_disk_loses_nothing_already_written(tmpfs, capsys, tiny_teacher, tiny_set):
    folder = _copy_set(tiny_set, tmpfs.path / "set")
    # A killed run: its last chunk and the set were never written.
    (folder / "distilled.pt").unlink()
    last_chunk = sorted((folder / "chunks").iterdir())[-1]
    last_chunk.unlink()
    before = _digests(folder)
    filler = tmpfs.fill()
    line = assert_one_line_error(capsys, _recover_argv(tiny_teacher.path, folder), "disk is full")
    assert str(folder) in line and "nothing was replaced" in line
    assert _digests(folder) == before  # no temporary file left, every file as it was
    filler.unlink()
    assert run_cli(capsys, _recover_argv(tiny_teacher.path, folder))[0] == 0
    resumed = torch.load(folder / "distilled.pt", weights_only=True)
    original = torch.load(tiny_set / "distilled.pt", weights_only=True)
    assert torch.equal(resumed["images"], original["images"])


def test_full_disk_during_torch_save_keeps_the_old_file(tmpfs):
    from delt.io import WriteError, torch_load, torch_save

    path = tmpfs.path / "kept.pt"
    torch_save({"x": torch.arange(4)}, path)
    filler = tmpfs.fill()
    with pytest.raises(WriteError, match="disk is full") as error:
        torch_save({"x": torch.randn(1 << 20)}, path)
    assert str(path) in str(error.value)
    assert torch.equal(torch_load(path)["x"], torch.arange(4))
    assert sorted(p.name for p in tmpfs.path.iterdir()) == [filler.name, "kept.pt"]


# --------------------------------------------------------------------------------------------
# Sizes that cannot fit


def test_absurd_resolution_is_refused_up_front(tmp_path, capsys):
    argv = ["teacher", "--out", tmp_path / "t", "--dataset", "synthetic", "--resolution", 100000]
    line = assert_one_line_error(capsys, argv, "--resolution 100000", "3x100000x100000")
    assert " GB of memory" in line and "are available on cpu" in line
    assert not (tmp_path / "t").exists()


def test_absurd_ipc_is_refused_up_front(tmp_path, capsys, tiny_teacher):
    argv = _recover_argv(tiny_teacher.path, tmp_path / "r")
    argv[argv.index("--ipc") + 1] = 10**9
    line = assert_one_line_error(capsys, argv, "--ipc 1000000000", "of memory")
    assert "available" in line and not (tmp_path / "r" / "chunks").exists()


def test_absurd_batch_is_refused_with_the_numbers():
    from delt.data import DatasetInfo
    from delt.models import check_model_memory
    from delt.runtime import ResourceError, available_memory

    info = DatasetInfo("x", 10, 3, 64, (0.5,) * 3, (0.25,) * 3, tuple(map(str, range(10))))
    check_model_memory("convnet3", info, {"width": 8}, 64, "cpu", True, "--batch-size 64")
    batch = available_memory(torch.device("cpu")) // (3 * 64 * 64 * 4) + 1
    with pytest.raises(ResourceError, match=f"--batch-size {batch}: convnet3 .* need .* GB"):
        check_model_memory(
            "convnet3", info, {"width": 8}, batch, "cpu", False, f"--batch-size {batch}"
        )


# --------------------------------------------------------------------------------------------
# The thread count: fixed by default, whatever the machine's load, and recorded


@pytest.mark.parametrize("flags, expected", [((), DEFAULT_THREADS), (("--threads", "2"), 2)])
def test_threads_are_fixed_and_recorded(tmp_path, capsys, num_threads, flags, expected):
    num_threads(3)
    argv = [*flags, "teacher", "--out", tmp_path / "t", "--dataset", SYNTHETIC, "--arch"]
    argv += ["convnet1", "--width", 4, "--epochs", 1, "--amp", "none", "--no-progress"]
    assert run_cli(capsys, argv)[0] == 0
    meta = json.loads((tmp_path / "t" / "teacher.json").read_text())
    assert meta["versions"]["torch_threads"] == str(expected)
    assert torch.get_num_threads() == 3  # restored after the command


def test_demo_threads_are_fixed():
    # The README's committed demo output is of a 2-thread run; the count no longer depends on
    # the idle cores.
    assert DemoConfig().threads == 2
    import delt.demo

    assert not hasattr(delt.demo, "idle_cores")
