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
    files = [*root.glob("*.md"), *(root / "docs").rglob("*.md"), *(root / "python").rglob("*.py")]
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
        capture_output=True,
        text=True,
    )
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


# --------------------------------------------------------------------------------------------
# The second audit (issue 29): non-finite values, high-depth and corrupt images, sidecars,
# selections, and messages that broke the one-line contract


def _set_with_pixel(tiny_set, destination, value):
    """A copy of ``tiny_set`` whose image 1 holds one ``value`` pixel, with a matching digest
    (as a run whose optimization diverged would have written it)."""
    folder = _copy_set(tiny_set, destination)
    payload = torch.load(folder / "distilled.pt", weights_only=True)
    payload["images"][1, 0, 2, 3] = value
    torch.save(payload, folder / "distilled.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["distilled_sha256"] = hashlib.sha256(
        (folder / "distilled.pt").read_bytes()
    ).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for name in ("eval.json", "diversity.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


@pytest.mark.parametrize(
    "flag, value",
    [("--lr", "1e300"), ("--r-bn", "1e39"), ("--first-bn-multiplier", "1e308"),
     ("--r-bn", "nan"), ("--beta1", "inf")],
)  # fmt: skip
def test_float_flags_beyond_float32_are_refused_before_any_work(
    tmp_path, capsys, tiny_teacher, flag, value
):
    out = tmp_path / "r"
    argv = [*_recover_argv(tiny_teacher.path, out), flag, value]
    line = assert_one_line_error(capsys, argv, flag, "float32")
    assert run_cli(capsys, argv)[0] == 2 and "internal" not in line
    assert not out.exists()


def test_float_flags_of_every_command_are_checked(tmp_path, capsys, tiny_set):
    argv = ["eval", "--distilled", tiny_set, "--epochs", 1, "--lr", "1e300", "--no-progress"]
    assert_one_line_error(capsys, argv, "--lr", "float32")


@pytest.mark.parametrize("seed", [10**23, -1])
def test_seeds_beyond_a_generator_are_refused(tmp_path, capsys, tiny_teacher, tiny_set, seed):
    out = tmp_path / "r"
    argv = [*_recover_argv(tiny_teacher.path, out), "--seed", seed]
    line = assert_one_line_error(capsys, argv, "--seed", "0..2**64-1")
    assert "Overflow" not in line and not out.exists()
    argv = ["eval", "--distilled", tiny_set, "--epochs", 1, "--seeds", f"0,{seed}"]
    assert_one_line_error(capsys, argv, "--seeds", "0..2**64-1")


def test_a_loss_that_overflows_stops_the_recovery_naming_chunk_iteration_and_flags(
    tmp_path, capsys, tiny_teacher
):
    # 1e38 fits float32, but the loss it scales does not: the first step's loss is infinite.
    out = tmp_path / "r"
    argv = [*_recover_argv(tiny_teacher.path, out), "--r-bn", "1e38"]
    status, lines, err = run_cli(capsys, argv)
    assert status == 2 and len(lines) == 1, err
    line = lines[0]
    assert line.startswith("delt recover: error: chunk 0 ")
    for text in ("at iteration 0 of 4", "--r-bn 1e+38", "--first-bn-multiplier 10", "--lr"):
        assert text in line, line
    assert not (out / "distilled.pt").exists()
    assert not list((out / "chunks").glob("*.pt")) if (out / "chunks").exists() else True


def test_a_chunk_with_nan_pixels_is_never_mixed_in(tmp_path, capsys, tiny_teacher, tiny_set):
    folder = _copy_set(tiny_set, tmp_path / "set")
    (folder / "distilled.pt").unlink()
    chunk = sorted((folder / "chunks").iterdir())[0]
    payload = torch.load(chunk, weights_only=True)
    payload["images"][0, 0, 0, 0] = float("nan")
    torch.save(payload, chunk)
    line = assert_one_line_error(capsys, _recover_argv(tiny_teacher.path, folder), chunk)
    assert "non-finite" in line and "delete it" in line
    assert not (folder / "distilled.pt").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("command", ["eval", "diversity"])
def test_a_set_with_one_non_finite_pixel_is_refused(tmp_path, capsys, tiny_set, command, value):
    folder = _set_with_pixel(tiny_set, tmp_path / "set", value)
    argv = [command, "--distilled", folder]
    if command == "eval":
        argv += ["--epochs", 1, "--no-progress"]
    assert_one_line_error(capsys, argv, folder / "distilled.pt", "image 1", "non-finite")
    assert not (folder / "eval.json").exists() and not (folder / "diversity.json").exists()


def test_report_refuses_a_non_finite_result(tmp_path, capsys, tiny_set):
    folder = _copy_set(tiny_set, tmp_path / "set")
    assert run_cli(capsys, ["eval", "--distilled", folder, "--epochs", 1, "--no-progress"])[0] == 0
    assert run_cli(capsys, ["diversity", "--distilled", folder])[0] == 0
    assert run_cli(capsys, ["report", "--runs", folder, "--out", tmp_path / "c.png"])[0] == 0
    path = folder / "diversity.json"
    document = json.loads(path.read_text())
    document["mean"] = float("nan")  # as an earlier delt wrote it for a NaN set
    path.write_text(json.dumps(document))
    argv = ["report", "--runs", folder, "--out", tmp_path / "d.png"]
    assert_one_line_error(capsys, argv, path, "NaN")
    report = tmp_path / "run" / "report.json"
    report.parent.mkdir()
    report.write_text(
        '{"method": "delt", "dataset": "x", "ipc": 1, "accuracy_mean": 1e999, '
        '"accuracy_std": 0.0, "diversity": 0.5, "synthesis_seconds": 1.0, "image_iterations": 1}'
    )
    argv = ["report", "--runs", report.parent, "--out", tmp_path / "e.png"]
    assert_one_line_error(capsys, argv, report, "accuracy_mean", "not a finite number")
    assert not (tmp_path / "d.png").exists() and not (tmp_path / "e.png").exists()


def test_out_empty_is_refused(tmp_path, capsys, tiny_teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["recover", "--teacher", tiny_teacher.path, "--ipc", 1, "--out", "", "--method", "cda"]
    assert_one_line_error(capsys, argv, "--out is empty")
    assert list(tmp_path.iterdir()) == []
    # A flag whose default is empty (a chart's title) may be empty.
    assert_one_line_error(capsys, ["report", "--runs", tmp_path, "--title", ""], "report.json")


def test_another_teacher_file_is_named_as_such(tmp_path, capsys, tiny_teacher, three_class_teacher):
    out = tmp_path / "r"
    argv = _recover_argv(tiny_teacher.path, out)
    assert run_cli(capsys, [*argv, "--keep-chunks"])[0] == 0
    other = tmp_path / "other" / "teacher.pt"
    other.parent.mkdir()
    shutil.copy(tiny_teacher.path, other)
    shutil.copy(tiny_teacher.path.with_suffix(".json"), other.with_suffix(".json"))
    (out / "distilled.pt").unlink()  # unfinished: the identity is checked
    # Another teacher of the same data and shape, retrained: another SHA-256.
    from delt.models import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(other)
    with torch.no_grad():
        next(checkpoint.model.parameters()).add_(1.0)
    save_checkpoint(other, checkpoint.model, checkpoint.meta)
    argv[argv.index("--teacher") + 1] = other
    line = assert_one_line_error(capsys, argv, "--teacher: the teacher's SHA-256 differs")
    assert "another teacher file" in line
    assert "the file changed since the first run;" not in line


def test_a_manifest_class_count_lie_is_blamed_on_the_manifest(tmp_path, capsys, tiny_set):
    folder = _copy_set(tiny_set, tmp_path / "set")
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["dataset"]["num_classes"] = 5
    manifest["dataset"]["class_names"].append("class4")
    path.write_text(json.dumps(manifest))
    for argv in (
        ["eval", "--distilled", folder, "--epochs", 1],
        ["diversity", "--distilled", folder],
    ):
        line = assert_one_line_error(capsys, argv, path, "has 5 classes", "trained on 4")
        assert "the manifest contradicts itself" in line and "--teacher" not in line


def test_duplicate_option_of_a_synthetic_dataset_is_refused(tmp_path, capsys):
    name = "synthetic:classes=4,size=8,classes=3"
    argv = ["teacher", "--out", tmp_path / "t", "--dataset", name, "--arch", "convnet1"]
    assert_one_line_error(capsys, argv, "option 'classes' is given twice")
    assert not (tmp_path / "t" / "teacher.pt").exists()


@pytest.mark.parametrize(
    "content, expected",
    [(b"class0\n\xff\xfeclass1\n", "not a UTF-8 text file"), (b"", "lists no class"),
     (b"\n  \n", "lists no class")],
)  # fmt: skip
def test_class_order_file_unreadable_or_empty(tmp_path, capsys, content, expected):
    from imagefolders import write_image_folder

    root = write_image_folder(tmp_path / "data", ["a", "b"], 2, 1, 8)
    order = tmp_path / "order.txt"
    order.write_bytes(content)
    argv = ["teacher", "--out", tmp_path / "t", "--dataset", "imagefolder", "--data-root", root,
            "--class-order", order, "--resolution", 8, "--arch", "convnet1"]  # fmt: skip
    status, lines, err = run_cli(capsys, argv)
    assert status == 2 and len(lines) == 1, err
    assert f"--class-order {order}" in lines[0] and expected in lines[0]


def test_nfc_and_nfd_folder_names_are_shown_apart(tmp_path):
    import unicodedata

    from delt.data import DataMismatchError, load_like
    from imagefolders import write_image_folder

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    teacher_root = write_image_folder(tmp_path / "a", [nfc, "tea"], 1, 1, 8)
    data_root = write_image_folder(tmp_path / "b", [nfd, "tea"], 1, 1, 8)
    from delt.data import load_dataset

    info = load_dataset("imagefolder", "train", str(teacher_root), resolution=8).info
    with pytest.raises(DataMismatchError) as caught:
        load_like(info, "train", str(data_root))
    message = str(caught.value)
    unknown = message.split("not known to the teacher: ")[1].split(";")[0]
    missing = message.split("missing: ")[1].split(";")[0].split(")")[0]
    assert unknown != missing, message  # shown so that they differ
    assert "Unicode normalization" in message


# Images of other depths and broken files in `delt import`


def _import_argv(tiny_teacher, images, out):
    return ["import", "--images", images, "--teacher", tiny_teacher.path, "--out", out]


def _released(root, writer):
    """4 class folders new000..new003 of 2 8x8 images each, written by ``writer(path, c, k)``."""
    for c in range(4):
        (root / f"new{c:03d}").mkdir(parents=True)
        for k in range(2):
            writer(root / f"new{c:03d}" / f"class{c:03d}_id{k:03d}.png", c, k)
    return root


def test_import_scales_16_bit_grayscale(tmp_path, capsys, tiny_teacher):
    import numpy as np
    from PIL import Image

    values = {}

    def write(path, c, k):
        array = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 257 * c).astype(np.uint16)
        Image.fromarray(array).save(path)  # a 16-bit grayscale PNG (PIL mode I;16)
        values[path.name] = array

    source = _released(tmp_path / "released", write)
    with Image.open(next(source.glob("new000/*.png"))) as image:
        assert image.mode in ("I;16", "I")
    out = tmp_path / "out"
    assert run_cli(capsys, _import_argv(tiny_teacher, source, out))[0] == 0
    stored = torch.load(out / "distilled.pt", weights_only=True)["images"]
    expected = torch.from_numpy(
        ((values["class000_id000.png"].astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    )
    assert torch.equal(stored[0, 0], expected) and torch.equal(stored[0, 2], expected)
    assert stored.float().mean() < 200  # not saturated at 255


def test_import_scales_16_bit_rgb(tmp_path, capsys, tiny_teacher):
    import struct
    import zlib

    def png16(path, c, k):
        # A 16-bit RGB PNG, by hand (PIL does not write them): every sample 0x8000 + c.
        raw = b"".join(b"\0" + struct.pack(">H", 0x8000 + c) * 3 * 8 for _ in range(8))

        def chunk(kind, data):
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data)))  # fmt: skip

        header = struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))  # fmt: skip

    source = _released(tmp_path / "released", png16)
    out = tmp_path / "out"
    assert run_cli(capsys, _import_argv(tiny_teacher, source, out))[0] == 0
    stored = torch.load(out / "distilled.pt", weights_only=True)["images"]
    assert set(stored.unique().tolist()) == {128}  # 0x8000 / 65535 of 255, not 255


def test_import_refuses_a_float_image_by_name(tmp_path, capsys, tiny_teacher):
    import numpy as np
    from PIL import Image

    def write(path, c, k):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)

    source = _released(tmp_path / "released", write)
    bad = source / "new001" / "class001_id001.png"
    # A 32-bit float TIFF under a .png name: PIL opens it by its content, mode F.
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)).save(bad, format="TIFF")
    argv = _import_argv(tiny_teacher, source, tmp_path / "out")
    assert_one_line_error(capsys, argv, bad, "floating-point")
    assert run_cli(capsys, argv)[0] == 2
    assert not (tmp_path / "out" / "distilled.pt").exists()


@pytest.mark.parametrize("damage", ["truncated JPEG", "garbage PNG"])
def test_import_refuses_a_broken_image_by_name_with_status_2(
    tmp_path, capsys, tiny_teacher, damage
):
    from imagefolders import write_images

    suffix = "jpg" if damage == "truncated JPEG" else "png"
    source = tmp_path / "released"
    for c in range(4):
        write_images(source / f"new{c:03d}", 2, 8, seed=c, suffix=suffix)
    bad = sorted((source / "new002").iterdir())[1]
    data = bad.read_bytes()
    bad.write_bytes(
        data[: len(data) // 2] if damage == "truncated JPEG" else b"\x89PNG garbage" * 9
    )
    argv = _import_argv(tiny_teacher, source, tmp_path / "out")
    status, lines, err = run_cli(capsys, argv)
    assert status == 2 and len(lines) == 1, err
    assert str(bad) in lines[0] and "not a readable image" in lines[0]
    assert not (tmp_path / "out" / "distilled.pt").exists()
