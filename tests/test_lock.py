"""delt.lock: one writer per output folder, stale locks taken over, torchrun ranks sharing."""

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
from delt.io import check_output, remove_stray_temporaries
from delt.lock import LOCK_NAME, OutputLockedError, output_lock


def _hold(folder, record):
    """Holds ``folder/.lock`` as another process would: a separate open file with LOCK_EX."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps(record).encode())
    return fd


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_lock_records_its_holder_and_is_gone_after(tmp_path):
    out = tmp_path / "out"
    with output_lock(out) as lock:
        assert lock.held and lock.previous is None
        record = json.loads((out / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["started"] and record["job"] is None
        with output_lock(out) as nested:  # a command calling another on the same folder
            assert nested is lock
        assert (out / LOCK_NAME).is_file()
    assert not (out / LOCK_NAME).exists()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    record = {"host": "elsewhere", "pid": 4242, "started": "2026-01-01 00:00:00 UTC", "job": None}
    fd = _hold(tmp_path, record)
    try:
        with pytest.raises(OutputLockedError) as refused:
            with output_lock(tmp_path):
                pytest.fail("entered a folder another process holds")
        message = str(refused.value)
        assert "\n" not in message
        assert f"--out {tmp_path} is being written by another process" in message
        assert "pid 4242 on elsewhere, started 2026-01-01 00:00:00 UTC" in message
    finally:
        os.close(fd)
    with output_lock(tmp_path) as lock:  # released: free again
        assert lock.held


def test_a_holder_whose_pid_is_gone_is_named_as_such(tmp_path):
    pid = _dead_pid()
    fd = _hold(tmp_path, {"host": socket.gethostname(), "pid": pid, "started": "t", "job": None})
    try:
        with pytest.raises(OutputLockedError, match=f"pid {pid} .*that pid is gone"):
            with output_lock(tmp_path):
                pass
    finally:
        os.close(fd)


def test_a_stale_lock_of_a_killed_run_is_taken_over_and_reported(tmp_path, caplog):
    pid = _dead_pid()
    record = {"host": socket.gethostname(), "pid": pid, "started": "yesterday", "job": None}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))  # the file stays, the flock does not
    with caplog.at_level(logging.WARNING, logger="delt"):
        with output_lock(tmp_path) as lock:
            assert lock.held and lock.previous == record
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"pid {pid} on {socket.gethostname()}, started yesterday" in caplog.text
    assert "taking it over" in caplog.text


def test_the_ranks_of_one_job_share_the_lock(tmp_path, monkeypatch):
    fd = _hold(tmp_path, {"host": "h", "pid": 1, "started": "t", "job": "job-7"})
    try:
        with output_lock(tmp_path, shared_job_id="job-7") as lock:
            assert not lock.held  # a rank of the holder's job goes on without holding it
        with pytest.raises(OutputLockedError):
            with output_lock(tmp_path, shared_job_id="job-8"):
                pass
        # Under torchrun the job id comes from the environment.
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29500")
        with pytest.raises(OutputLockedError):  # another job
            with output_lock(tmp_path):
                pass
    finally:
        os.close(fd)
    with output_lock(tmp_path) as lock:
        job = json.loads((tmp_path / LOCK_NAME).read_text())["job"]
        assert lock.held and job == "none:127.0.0.1:29500"
    fd = _hold(tmp_path, {"host": "h", "pid": 1, "started": "t", "job": job})
    try:
        with output_lock(tmp_path) as lock:  # a rank of this job
            assert not lock.held
    finally:
        os.close(fd)


def test_another_process_is_refused_at_once(tmp_path):
    # A real second process (python -c) against a lock this process holds.
    code = (
        "import sys\n"
        "from delt.lock import OutputLockedError, output_lock\n"
        "try:\n"
        "    with output_lock(sys.argv[1]):\n"
        "        sys.exit(0)\n"
        "except OutputLockedError as error:\n"
        "    print(error)\n"
        "    sys.exit(3)\n"
    )
    with output_lock(tmp_path / "out"):
        result = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "out")],
            capture_output=True, text=True, cwd=tmp_path, timeout=120,
        )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert f"pid {os.getpid()} on {socket.gethostname()}" in result.stdout


def test_stray_temporaries_are_ours_only(tmp_path):
    (tmp_path / "images" / "000").mkdir(parents=True)
    ours = [
        tmp_path / ".manifest.json.ab_cd123.tmp",
        tmp_path / "images" / "000" / ".001.png.k2j4l5m6.tmp",
    ]
    theirs = [
        tmp_path / "notes.tmp",
        tmp_path / ".hidden.tmp",
        tmp_path / "images" / "000" / "001.png",
    ]
    locked = tmp_path / "sub"  # another command's folder: it cleans its own
    locked.mkdir()
    (locked / LOCK_NAME).write_text("{}")
    theirs.append(locked / ".x.json.abcdefgh.tmp")
    for path in ours + theirs:
        path.write_text("x")
    removed = remove_stray_temporaries(tmp_path)
    assert sorted(removed) == sorted(ours)
    assert all(path.exists() for path in theirs)
    only = tmp_path / ".eval.json.abcdefgh.tmp"
    other = tmp_path / ".diversity.json.abcdefgh.tmp"
    only.write_text("x")
    other.write_text("x")
    assert remove_stray_temporaries(tmp_path, names=("eval.json",), recursive=False) == [only]
    assert other.exists()


def test_the_writability_probe_is_not_taken_for_a_stray_temporary(tmp_path, monkeypatch):
    # Another rank (or a command whose --out is below this folder) probes while a sweep runs:
    # the probe's name must not be one the sweep deletes.
    probes = []
    unlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda path: probes.append(path) or unlink(path))
    check_output(tmp_path / "new", "--out")
    monkeypatch.setattr(os, "unlink", unlink)
    (probe,) = probes
    assert os.path.dirname(probe) == str(tmp_path)  # the nearest existing folder
    with open(probe, "w") as handle:
        handle.write("")  # as if still there when the sweep runs
    assert remove_stray_temporaries(tmp_path) == []
    assert os.path.exists(probe)


def test_a_folder_made_for_the_lock_goes_again_if_nothing_was_written(tmp_path):
    with pytest.raises(RuntimeError):
        with output_lock(tmp_path / "refused"):
            raise RuntimeError("the command was refused before writing")
    assert not (tmp_path / "refused").exists()
    with output_lock(tmp_path / "kept"):
        (tmp_path / "kept" / "run.json").write_text("{}")
    assert _files_in(tmp_path / "kept") == ["run.json"]


def _files_in(folder):
    return sorted(path.name for path in folder.iterdir())
