"""One code path for any world size: the ``torchrun`` environment, the process group, and the
few collectives the commands use (docs/distributed.md).

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) :func:`session` initializes
``torch.distributed`` (NCCL for CUDA devices, Gloo for ``--device cpu``), binds
``cuda:LOCAL_RANK`` and tears the group down at the end; every rank logs to
``OUT/logs/rank-<r>.log``. Without torchrun every helper here is the world-size-1 case: no
process group, no log file, :func:`barrier` does nothing, :func:`broadcast` and
:func:`all_gather` return their argument, so one-process runs are what they were.

Shared outputs are rank 0's (:func:`is_main`); :func:`main_first` lets rank 0 create a file
(``run.json``, a stage's picks) before the other ranks read it. A rank that dies takes the job
down: torchrun stops the others, and a collective waits at most :func:`timeout_seconds`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from delt.runtime import logger

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "OutputLock",
    "World",
    "all_gather",
    "alone",
    "barrier",
    "broadcast",
    "is_main",
    "main_first",
    "session",
    "timeout_seconds",
    "torchrun_environment",
    "world",
]

T = TypeVar("T")

# A collective (a barrier before rank 0 assembles, a stage's hard-init student on rank 0) waits
# at most this long for a rank that stopped answering; DELT_DIST_TIMEOUT overrides it.
DEFAULT_TIMEOUT_SECONDS = 1800


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, ``local_rank`` on its
    node (the CUDA device it binds). A one-process run is ``World(0, 1, 0)``."""

    rank: int
    size: int
    local_rank: int


def torchrun_environment() -> World | None:
    """The ``World`` torchrun describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else None.

    Raises:
        ValueError: the variables are set but not integers, or the rank is out of range.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(name in os.environ for name in names):
        return None
    try:
        rank, size, local_rank = (int(os.environ[name]) for name in names)
    except ValueError:
        values = ", ".join(f"{name}={os.environ[name]!r}" for name in names)
        raise ValueError(f"torchrun environment: expected integers, got {values}") from None
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise ValueError(
            f"torchrun environment: RANK={rank} must be in [0, WORLD_SIZE={size}) and "
            f"LOCAL_RANK={local_rank} >= 0"
        )
    return World(rank, size, local_rank)


def timeout_seconds() -> float:
    """How long a collective waits for a silent rank: ``DELT_DIST_TIMEOUT`` or the default."""
    text = os.environ.get("DELT_DIST_TIMEOUT")
    if text is None:
        return float(DEFAULT_TIMEOUT_SECONDS)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"DELT_DIST_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return value


def world() -> World:
    """The current job: from the initialized process group, else the one-process world."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(0, 1, 0)


def is_main() -> bool:
    """Whether this process writes shared outputs and shows progress (rank 0)."""
    return world().rank == 0


# Set by :func:`alone`: rank 0 runs a command by itself, the other ranks have left.
_alone = False


def _active() -> bool:
    return not _alone and world().size > 1


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """A block rank 0 runs by itself while the other ranks of its job have left (a command that
    makes one output, ``Command.main_rank_only``): the collectives do nothing in it, as in a
    one-process run, instead of waiting for ranks that will never come."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def barrier() -> None:
    """Waits for every rank (bounded by the group's timeout); nothing without a group."""
    if _active():
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` without a group."""
    if not _active():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first; the others run it after rank 0 has left it.

    For a file that rank 0 creates and every rank reads (``run.json``, a stage's picks): the
    others find it written. If rank 0 raises, it never reaches the barrier; its exit makes
    torchrun stop the job.
    """
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def _backend(device: str) -> str:
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return "nccl"
    return "gloo"


OutputLock = Callable[[Path], contextlib.AbstractContextManager]
"""``folder -> context manager`` holding an output-folder lock (``OUT/.lock``) while open."""


@contextlib.contextmanager
def session(
    device: str = "auto", out: str | os.PathLike | None = None, lock: OutputLock | None = None
) -> Iterator[World]:
    """Runs one command as a rank of a torchrun job, or as the one process it is without one.

    Under torchrun: initializes the process group (NCCL when ``device`` is CUDA, or ``auto``
    with a GPU present; Gloo for ``cpu``) with :func:`timeout_seconds`, binds
    ``cuda:LOCAL_RANK``, logs this rank's records to ``out/logs/rank-<r>.log``, quiets the other
    ranks' console to warnings, and destroys the group on the way out (also on an error). A
    group already initialized (a command run by another, e.g. ``delt distill``) is reused.

    ``lock`` (with ``out``): the job's hold on the output folder. One process takes it; under
    torchrun rank 0 takes it for the whole job before any rank goes on (the ranks of one job
    share it, another job pointed at ``out`` is refused by rank 0's failure to take it).
    """
    environment = torchrun_environment()
    if environment is None or (dist.is_available() and dist.is_initialized()):
        with contextlib.ExitStack() as held:
            if lock is not None and out is not None and is_main():
                held.enter_context(lock(Path(out)))
            yield world()
        return
    backend = _backend(device)
    if backend == "nccl":
        if environment.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={environment.local_rank}: this node has "
                f"{torch.cuda.device_count()} CUDA device(s); start at most that many ranks "
                "per node (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(environment.local_rank)
    handler: logging.Handler | None = None
    quieted: list[tuple[logging.Handler, int]] = []
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
        if out is not None:
            path = Path(out) / "logs" / f"rank-{environment.rank}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path)
            rank = environment.rank
            handler.setFormatter(
                logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(message)s")
            )
            logger.addHandler(handler)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        if environment.rank != 0:
            for console in logging.getLogger().handlers:
                quieted.append((console, console.level))
                console.setLevel(max(console.level, logging.WARNING))
        logger.info(
            "rank %d of %d (local rank %d, pid %d, backend %s, host %s)",
            environment.rank, environment.size, environment.local_rank, os.getpid(), backend,
            os.uname().nodename,
        )  # fmt: skip
        with contextlib.ExitStack() as held:
            with main_first():
                if lock is not None and out is not None and is_main():
                    held.enter_context(lock(Path(out)))
            yield world()
    finally:
        for console, level in quieted:
            console.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        if dist.is_initialized():
            dist.destroy_process_group()
