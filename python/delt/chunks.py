"""The chunk store: the one resume mechanism of every method. A set of ``num_classes x ipc``
images is made chunk by chunk (:mod:`delt.schedules`); chunk ``k`` is saved to
``FOLDER/<k>.pt`` when done, with the identity of the run that made it, and loaded instead of
made again on a re-run, so a killed run resumes to the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from delt.config import ConfigError
from delt.data import DatasetInfo
from delt.distributed import barrier, broadcast, world
from delt.identity import identity_differences
from delt.io import FileFormatError, IntegrityError, torch_load, torch_save
from delt.runtime import logger
from delt.schedules import Chunk

__all__ = ["ChunkResult", "ChunkStore", "chunk_digest"]


def chunk_digest(payload: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of a chunk file's content (every field but ``digest``: each tensor's
    dtype, shape and bytes, each other value as JSON), saved with the chunk and checked before
    the chunk is used, so that a flipped bit is refused instead of mixed into the set."""
    digest = hashlib.sha256()
    for key in sorted(payload):
        if key == "digest":
            continue
        value = payload[key]
        digest.update(f"{key}\0".encode())
        if isinstance(value, Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tensor.dtype}{tuple(value.shape)}\0".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True).encode())
        digest.update(b"\0")
    return f"sha256:{digest.hexdigest()}"


@dataclass
class ChunkResult:
    """A finished chunk: final images (B, C, H, W) float32 (CPU), final loss, seconds, and
    ``extra``: tensors a method saves beside them in the chunk file (rded: the crop sources).

    ``seconds``: wall time of the chunk's making (for an optimized chunk, every step of its
    loop, a ``--compile`` warm-up inside the first steps, and the copy of the result to the
    CPU; not its initialization or saving). Summed over chunks it is the manifest's
    ``synthesis_seconds``.
    """

    images: Tensor
    loss: float
    seconds: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class ChunkStore:
    """The chunks of one set of ``ipc`` images per class in ``folder``.

    Args:
        identity: what made this set (JSON values): saved in every chunk; a saved chunk with
            another one is refused. A chunk saved before identities existed is accepted (its
            run's ``run.json``, checked before, matches). None: neither saved nor checked.
        defaults: the identity's defaults (:func:`delt.identity.identity_differences`).
    """

    def __init__(
        self,
        folder: Path,
        info: DatasetInfo,
        ipc: int,
        identity: dict | None = None,
        defaults: dict | None = None,
    ) -> None:
        self.folder, self.info, self.ipc = folder, info, ipc
        self.identity, self.defaults = identity, defaults or {}

    def path(self, chunk: Chunk) -> Path:
        return self.folder / f"{chunk.index:05d}.pt"

    def save(self, chunk: Chunk, result: ChunkResult, iterations: list[int]) -> None:
        """Written atomically by the rank that made it: a killed run or job resumes from it."""
        identity = {} if self.identity is None else {"identity": json.dumps(self.identity)}
        payload = {
            "images": result.images,
            "labels": torch.tensor(chunk.classes, dtype=torch.int64),
            "positions": torch.tensor(chunk.positions(self.ipc), dtype=torch.int64),
            "iterations": torch.tensor(iterations, dtype=torch.int64),
            "seconds": result.seconds,
            "loss": result.loss,
            **result.extra,
            **identity,
        }
        torch_save({**payload, "digest": chunk_digest(payload)}, self.path(chunk))

    def load(self, chunk: Chunk) -> tuple[Tensor, float, list[int]]:
        """``(images, seconds, iterations)`` of a saved chunk.

        Raises:
            ConfigError: it holds other positions, or was made with another identity.
            FileFormatError: it is unreadable or holds images of another shape.
            IntegrityError: its contents do not match its digest.
        """
        path, positions = self.path(chunk), chunk.positions(self.ipc)
        keys = ("images", "positions", "iterations", "seconds")
        try:
            saved = torch_load(path, "recovery chunk", keys=keys)
        except FileFormatError as error:
            raise FileFormatError(f"{error} (delete it to make that chunk again)") from None
        if saved["positions"].tolist() != positions:
            raise ConfigError(f"{path} does not hold chunk {chunk.index} of this run")
        recorded = saved.get("identity")
        if self.identity is not None and recorded is not None:
            differences = identity_differences(json.loads(recorded), self.identity, self.defaults)
            if differences:
                raise ConfigError(
                    f"{path} was made by another run ({'; '.join(differences)}); it is not "
                    "mixed into this one: delete it to recompute it, or choose another --out"
                )
        info = self.info
        expected = (len(positions), info.channels, info.resolution, info.resolution)
        images = saved["images"]
        if not isinstance(images, Tensor) or tuple(images.shape) != expected:
            raise FileFormatError(f"{path}: not a recovery chunk of {expected} images")
        if images.is_floating_point() and not bool(torch.isfinite(images).all()):
            raise FileFormatError(
                f"{path}: holds non-finite pixels (NaN or infinite); delete it to make that "
                "chunk again"
            )
        # Last, after the checks that say more: any other change (a flipped bit anywhere).
        # Chunks saved before digests existed have none: accepted (run.json was checked).
        if "digest" in saved and saved["digest"] != chunk_digest(saved):
            raise IntegrityError(
                f"{path}: its contents do not match the digest saved with them (the chunk is "
                "corrupt); it is not mixed into the set: delete it to recompute that chunk"
            )
        return images, float(saved["seconds"]), saved["iterations"].tolist()

    def make_all(
        self,
        chunks: list[Chunk],
        chunk_seed: Callable[[Chunk], int],
        make_chunk: Callable[[Chunk, torch.Generator], tuple[ChunkResult, list[int]]],
        progress: bool = True,
        desc: str = "chunks",
        chunks_per_step: int = 1,
        make_chunks: Callable[
            [list[Chunk], list[torch.Generator]], list[tuple[ChunkResult, list[int]]]
        ]
        | None = None,
    ) -> tuple[Tensor, list[int], float]:
        """Makes (or loads, when already done) every chunk; the set.

        Chunk ``k``'s generator is seeded with ``chunk_seed(chunk)``, which makes its result
        independent of whether earlier chunks ran in this process. Under torchrun the chunks
        left to do are split across the ranks, and after a barrier every rank assembles the
        whole set from the folder (shared): the one-process result at any world size.

        Args:
            make_chunk: ``(chunk, generator) -> (result, iterations of each image)``: the
                chunk's images (len(chunk), C, H, W) float32 on the CPU, in chunk order.
            chunks_per_step, make_chunks: this rank's chunks still to do are made
                ``chunks_per_step`` at a time in chunk order, a group of two or more by
                ``make_chunks(group, generators)`` (one ``make_chunk`` result per chunk, each
                chunk with its own generator seeded as above); a group's chunks are saved when
                the group is done. A group of one, and every chunk without ``make_chunks``,
                goes to ``make_chunk``.

        Returns:
            ``(images (num_classes * ipc, C, H, W) float32 CPU class-major, iterations per
            image, seconds summed over chunks)``. A loaded chunk's seconds are the ones saved
            with it, so the sum is synthesis time, not this call's wall time.
        """
        info = self.info
        total_images = info.num_classes * self.ipc
        images = torch.empty(total_images, info.channels, info.resolution, info.resolution)
        iterations_per_image = [0] * total_images
        seconds_of: dict[int, float] = {}

        def place(chunk: Chunk, chunk_images: Tensor, seconds: float, iterations: list[int]):
            positions = chunk.positions(self.ipc)
            images[torch.tensor(positions, dtype=torch.int64)] = chunk_images
            for position, count in zip(positions, iterations, strict=True):
                iterations_per_image[position] = count
            seconds_of[chunk.index] = seconds

        # Under torchrun the chunks still to do are dealt round-robin over the ranks (rank 0's
        # view of the folder, so that every rank deals the same list).
        job = world()
        pending = broadcast([chunk.index for chunk in chunks if not self.path(chunk).is_file()])
        mine = set(pending[job.rank :: job.size])
        # The chunks saved before are checked first: a foreign or corrupt one is refused before
        # any work is done.
        for chunk in chunks:
            if chunk.index not in pending:
                place(chunk, *self.load(chunk))
        todo = [chunk for chunk in chunks if chunk.index in mine]
        step = chunks_per_step if make_chunks is not None else 1
        disable = None if progress else True  # None: a bar on a terminal only
        with tqdm(total=len(todo), desc=desc, disable=disable) as bar:
            for first in range(0, len(todo), step):
                group = todo[first : first + step]
                generators = [torch.Generator().manual_seed(chunk_seed(chunk)) for chunk in group]
                if len(group) == 1:
                    made = [make_chunk(group[0], generators[0])]
                else:
                    assert make_chunks is not None
                    made = make_chunks(group, generators)
                for chunk, (result, chunk_iterations) in zip(group, made, strict=True):
                    self.save(chunk, result, chunk_iterations)
                    logger.info(
                        "recover: %s %d/%d done in %.1f s (loss %.3f)",
                        desc, chunk.index + 1, len(chunks), result.seconds, result.loss,
                    )  # fmt: skip
                    place(chunk, result.images, result.seconds, chunk_iterations)
                bar.update(len(group))
        # Every rank assembles the whole set (the next PDD stage needs it); only rank 0 writes.
        barrier()
        for chunk in chunks:
            if chunk.index not in seconds_of:
                place(chunk, *self.load(chunk))  # made by another rank
        # Summed in chunk order, whoever made them.
        return images, iterations_per_image, sum((seconds_of[chunk.index] for chunk in chunks), 0.0)
