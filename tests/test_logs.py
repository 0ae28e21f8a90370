"""Logs: progress bars on a terminal only, so that a redirected run (``make demo > log 2>&1``)
writes a readable log: no carriage-return bar updates, at most a line per epoch or chunk."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

TEACHER = [
    "teacher", "--dataset", "synthetic:classes=3,channels=1,size=8", "--arch", "convnet1",
    "--width", "4", "--epochs", "2",
]  # fmt: skip
RECOVER = [
    "recover", "--method", "cda", "--ipc", "2", "--iterations", "3", "--batch-size", "3",
]  # fmt: skip


def delt(*args: str) -> list[str]:
    return [sys.executable, "-m", "delt", "--threads", "1", *args]


def run_redirected(argv: list[str], log) -> None:
    with open(log, "wb") as handle:
        subprocess.run(
            argv, stdout=handle, stderr=subprocess.STDOUT, check=True, timeout=300, cwd=log.parent
        )


def test_a_redirected_run_writes_no_progress_bars(tmp_path):
    log = tmp_path / "log"
    run_redirected(delt(*TEACHER, "--out", str(tmp_path / "t")), log)
    teacher = str(tmp_path / "t" / "teacher.pt")
    with open(log, "ab") as handle:
        subprocess.run(
            delt(*RECOVER, "--teacher", teacher, "--out", str(tmp_path / "r")),
            stdout=handle, stderr=subprocess.STDOUT, check=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
    text = log.read_bytes().decode()
    assert "\r" not in text and "it/s" not in text, text
    lines = text.splitlines()
    assert any("test accuracy" in line for line in lines)
    # One line per chunk (CDA at IPC 2: 2 chunks of one image per class), not one per step.
    chunk_lines = [line for line in lines if "chunks" in line and "done in" in line]
    assert len(chunk_lines) == 2, text
    assert len(lines) < 20, text


@pytest.mark.skipif(not hasattr(pty, "openpty"), reason="needs a pseudo-terminal")
def test_on_a_terminal_the_bars_are_shown(tmp_path):
    # The same command with stderr on a terminal draws its bars: the redirected run above is
    # quiet because of where it writes, not because bars are off.
    leader, follower = pty.openpty()
    # 24 rows, 80 columns (a new pseudo-terminal has 0 columns, where tqdm draws nothing).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        process = subprocess.Popen(
            delt(*TEACHER, "--out", str(tmp_path / "t")),
            stdout=subprocess.DEVNULL, stderr=follower, cwd=tmp_path,
            env={**os.environ, "TERM": "dumb"},
        )  # fmt: skip
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed: the process has ended
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=300) == 0
    finally:
        os.close(leader)
    assert b"\r" in output and b"teacher epoch" in output, output
