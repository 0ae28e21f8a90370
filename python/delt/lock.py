"""One writer per output folder: ``OUT/.lock``, an exclusive ``flock`` held for the command's life.

Every command that writes an output folder runs inside :func:`output_lock`. A second process
that wants the same folder is refused at once (:class:`OutputLockedError`, naming the holder's
host, pid and start time). The kernel drops a ``flock`` when its process dies, however it dies,
so a lock left by a killed run is free: the next run takes it over and says whose it was. The
holder deletes ``.lock`` when it is done (still holding it, so no one can slip in between), and
a finished folder holds no lock file; a folder nobody may write (read-only media) is left alone.

The ranks of one ``torchrun`` job share a lock: the first rank to arrive takes it and records
the job's id (``TORCHELASTIC_RUN_ID`` with the rendezvous address, or ``shared_job_id``); a rank
of that same job that finds it taken goes on without holding it, and everyone else is refused.
The holder must therefore be the last rank to leave the folder (rank 0 after the final barrier),
which is how a torchrun command that writes its outputs from rank 0 is structured anyway.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

from delt.config import ConfigError
from delt.distributed import main_first
from delt.io import check_output, remove_stray_temporaries
from delt.runtime import logger

__all__ = [
    "LOCK_NAME",
    "OutputLock",
    "OutputLockedError",
    "output_lock",
    "results_lock",
    "torchrun_job_id",
]

LOCK_NAME = ".lock"
# A rank of a shared job may find the lock taken before the holder wrote its record.
_RECORD_WAIT_SECONDS = 5.0


class OutputLockedError(ConfigError):
    """Another process is writing the output folder."""


@dataclass
class OutputLock:
    """A held (or, for a rank of the holder's job or on read-only media, shared) folder lock.

    ``held``: this process holds the ``flock``; ``previous``: the record of a stale lock this
    process took over (a killed run's), else None.
    """

    folder: Path
    held: bool
    previous: dict | None = None
    _fd: int | None = None

    def sweep(
        self,
        *folders: str | os.PathLike,
        names: tuple[str, ...] | None = None,
        recursive: bool = True,
    ) -> list[Path]:
        """Deletes the temporary files a killed run left (:func:`delt.io.remove_stray_temporaries`
        of each of ``folders``, default the locked folder) if this process holds the lock.

        Under torchrun the holder (rank 0) sweeps before any other rank goes on (a barrier,
        :func:`delt.distributed.main_first`): the other ranks write their own temporary files
        into the folder (their chunks), which a sweep running at the same time would take for a
        killed run's. So every rank of the job calls it, at the same point; in a one-process run
        (or one that rank 0 runs :func:`delt.distributed.alone`) it is the sweep alone.

        Returns:
            The files deleted.
        """
        removed: list[Path] = []
        with main_first():
            if self.held:
                for folder in folders or (self.folder,):
                    removed += remove_stray_temporaries(folder, names=names, recursive=recursive)
        return removed


# Locks this process holds, by resolved folder: a command that calls another command on the same
# folder (flock is per open file, so a second open would refuse its own process) nests.
_HELD: dict[str, OutputLock] = {}


def torchrun_job_id() -> str | None:
    """The id all ranks of the current ``torchrun`` job share, or None outside a multi-rank job."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    # torchrun's run id defaults to "none" without --standalone: the rendezvous address, which
    # no two live jobs share, tells jobs apart.
    parts = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")
    return ":".join(os.environ.get(name, "") for name in parts)


def _record(job_id: str | None) -> dict:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "job": job_id}


def _read_record(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", "replace")
    try:
        record = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _describe(record: dict | None, holding: bool = True) -> str:
    if record is None:
        return "a process that has not yet said who it is"
    text = f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"
    here = record.get("host") == socket.gethostname()
    if holding and here and not _pid_alive(int(record.get("pid", -1))):
        text += " (that pid is gone: a process it started still holds the lock)"
    return text


def _open_locked(path: Path) -> int | None:
    """An fd of ``path`` holding ``LOCK_EX``, or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder deletes the file while holding it: if ours is no longer the file
        # at ``path``, we locked a deleted inode and must try again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _holder_record(path: Path) -> dict | None:
    deadline = time.monotonic() + _RECORD_WAIT_SECONDS
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            record = _read_record(fd)
        finally:
            os.close(fd)
        if record is not None or time.monotonic() > deadline:
            return record
        time.sleep(0.05)


@contextmanager
def output_lock(
    folder: str | os.PathLike, shared_job_id: str | None = None, what: str = "--out"
) -> Iterator[OutputLock]:
    """Holds ``folder/.lock`` (creating ``folder``) for the ``with`` block.

    Args:
        folder: the output folder.
        shared_job_id: processes that pass the same id share the lock (the ranks of one job);
            default :func:`torchrun_job_id` (None outside torchrun: exclusive).
        what: the flag that named ``folder``, for the error message.

    Raises:
        OutputLockedError: another process (not of this job) holds it.
        WriteError: ``folder`` cannot be made or written (a file is in the way, read-only
            media, a full disk), naming ``what`` (:func:`delt.io.check_output`).
    """
    folder = Path(folder)
    check_output(folder, what, probe=False)
    key = os.path.realpath(folder)
    if key in _HELD:
        yield _HELD[key]
        return
    job_id = shared_job_id if shared_job_id is not None else torchrun_job_id()
    path = folder / LOCK_NAME
    # A folder made here and left empty (the command was refused) goes again at the end.
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path)
    except OSError as error:
        if error.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or not folder.is_dir():
            check_output(folder, what)  # the one-line reason, naming the flag
            raise
        # Nobody can write here (read-only media, or not ours): nothing to protect; a command
        # that still has something to write fails there with its own error.
        logger.debug("lock: %s is not writable (%s); not locking it", folder, error.strerror)
        lock = OutputLock(folder, held=False)
        _HELD[key] = lock
        try:
            yield lock
        finally:
            del _HELD[key]
        return
    if fd is None:
        record = _holder_record(path)
        if job_id is not None and record is not None and record.get("job") == job_id:
            lock = OutputLock(folder, held=False)  # a rank of the holder's job
        else:
            raise OutputLockedError(
                f"{what} {folder} is being written by another process ({_describe(record)}); "
                f"wait for it to finish or choose another {what} (lock: {path})"
            )
    else:
        previous = _read_record(fd)
        if previous is not None:
            logger.warning(
                "lock: %s was left by a run that ended without releasing it (%s); taking it over",
                path,
                _describe(previous, holding=False),
            )
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(_record(job_id)) + "\n").encode())
        except OSError as error:
            # The flock is what excludes; the record only names the holder. On a full disk the
            # command goes on and fails at its first real write, with that write's message.
            logger.debug("lock: cannot record the holder in %s (%s)", path, error.strerror)
        lock = OutputLock(folder, held=True, previous=previous, _fd=fd)
    _HELD[key] = lock
    try:
        yield lock
    finally:
        del _HELD[key]
        if lock._fd is not None:
            # Delete while still holding it: a waiting process then re-opens a fresh file.
            with suppress(OSError):
                os.unlink(path)
            os.close(lock._fd)
        if created:
            with suppress(OSError):
                folder.rmdir()  # only if empty


@contextmanager
def results_lock(path: str | os.PathLike) -> Iterator[OutputLock]:
    """:func:`output_lock` of the folder a results file (``eval.json``, ``diversity.json``)
    goes to, removing that file's stray temporaries: one writer of the folder at a time."""
    path = Path(path)
    # Without the folder there is nothing yet to protect (and no folder to make for a command
    # that may be refused); every rank still sweeps (the barrier), whichever it found.
    held = (
        output_lock(path.parent, what=f"the folder of {path.name}")
        if path.parent.is_dir()
        else nullcontext(OutputLock(path.parent, held=False))
    )
    with held as lock:
        lock.sweep(names=(path.name,), recursive=False)
        yield lock
