"""Several chunks per teacher step (``--chunks-per-step K``): K independent chunks of a set
optimized in one teacher forward and backward.

The teacher runs in eval mode, so an image's logits depend on that image alone; only the
BN-statistic term couples a chunk's images. Computing that term per chunk with the grouped
:func:`delt_ext.bn_stat_loss` (``group_index`` = each image's chunk) makes the loss of K chunks
in one batch the sum of their losses apart, and each chunk's gradient its own. Everything else a
chunk draws or schedules stays its own too: its generator (crops, flips, rolls, a union sample),
its Adam moments and step count (one Adam over K tensors), its cosine LR, crop curriculum and
EarlyLate rounds, over its own loop length. The result is what running the chunks one at a time
gives, up to float rounding (another batch size sums in another order): ``K`` is not part of a
run's identity, and a run resumes at any K (docs/chunks-per-step.md).

``K = 1`` is :func:`delt.synthesis.optimize_chunk`, untouched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import delt_ext
from delt.chunks import ChunkResult, ChunkStore
from delt.config import ConfigError
from delt.matching import ClassMatching
from delt.runtime import autocast
from delt.schedules import Chunk, chunk_schedule, cosine_lr, crop_min_scale
from delt.stats import BNStatistics
from delt.synthesis import (
    ActiveSets,
    ChunkOptimizer,
    NonFiniteError,
    RecoverySettings,
    Run,
    frozen_teacher,
)
from delt.synthesis import chunk_optimizer as one_chunk_optimizer

__all__ = [
    "ChunkClassMatching",
    "ChunkSlotMatching",
    "ChunkTask",
    "GroupedChunkOptimizer",
    "chunk_optimizer",
    "optimize_chunks",
]

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


class ChunkSlotMatching:
    """The matching target of K chunks in one batch: a base target's per-group targets, tiled
    once per chunk ("slot"), matched by the grouped :class:`delt_ext.BNStatMatching`.

    The base target is described by its per-group targets and each image's group in it: the
    teacher's running statistics (one group, the default), or per-class statistics
    (``targets`` of (G0, C_l) per BN layer and ``group_of`` mapping labels to rows), so that a
    per-class target and K chunks compose: image i of slot k is matched in group
    ``k * G0 + group_of(labels)[i]``.

    Args:
        model: the frozen teacher (hooked here; :meth:`remove` unhooks it).
        first_bn_multiplier: the first BN layer's weight.
        slots: K, the chunks per batch.
        targets: per BN layer (in ``model.named_modules()`` order, or by name), the base
            target's (mean, var) of shape (G0, C_l); None: the running statistics (G0 = 1).
        group_of: ``labels (N,) int64 -> (N,) int64`` base groups in ``[0, G0)``; None: all 0.
    """

    def __init__(
        self,
        model: nn.Module,
        first_bn_multiplier: float,
        slots: int,
        targets: Sequence[tuple[Tensor, Tensor]] | None = None,
        group_of: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        layers = [m for m in model.modules() if isinstance(m, _BN_TYPES)]
        if targets is None:
            targets = [(m.running_mean[None], m.running_var[None]) for m in layers]
        tiled = [(mean.repeat(slots, 1), var.repeat(slots, 1)) for mean, var in targets]
        self.matching = delt_ext.BNStatMatching(
            model, first_bn_multiplier=first_bn_multiplier, targets=tiled
        )
        self.slots = slots
        self.base_groups = tiled[0][0].shape[0] // slots
        self.group_of = group_of
        self.weights = self.matching.weights
        self._slot_weight: Tensor | None = None

    def set_batch(self, slot_index: Tensor, labels: Tensor) -> None:
        """Before a forward: the slot (N,) int64 and the label (N,) of every image of the
        batch, on the teacher's device."""
        group = slot_index * self.base_groups
        if self.group_of is not None:
            group = group + self.group_of(labels)
        # Weights of 1 that require grad: d loss / d weight is each group's weighted BN loss,
        # which gives every chunk's own loss (for its file and the NaN check) at no extra pass.
        self._slot_weight = torch.ones(
            self.slots * self.base_groups, device=slot_index.device, requires_grad=True
        )
        self.matching.set_groups(group, self._slot_weight)

    def slot_losses(self) -> Tensor:
        """(K,) each slot's share of the backpropagated loss through :meth:`loss` (after the
        backward of ``scale * loss()``: ``scale`` times each slot's BN-statistic loss)."""
        assert self._slot_weight is not None and self._slot_weight.grad is not None
        return self._slot_weight.grad.view(self.slots, self.base_groups).sum(1)

    def loss(self) -> Tensor:
        return self.matching.loss()

    def remove(self) -> None:
        self.matching.remove()


class ChunkClassMatching(ClassMatching):
    """The per-class matching target (``--match class`` or ``class-mean``, with
    ``--match-class-weight``; :class:`delt.matching.ClassMatching` for one chunk) of K chunks
    ("slots") in one batch: each slot's images against its own classes' targets, each slot's
    BN term what :class:`delt.matching.ClassMatching` gives that chunk apart.

    Per BN layer, with the grouped :func:`delt_ext.bn_stat_loss`:

    - ``class``: group ``k * classes + c`` holds slot k's images of class c, against class c's
      statistics, weighted ``1 / (classes present in slot k)`` (the mean over a chunk's classes);
    - ``class-mean``: group k holds slot k's images, against the mean over them of their
      classes' statistics;
    - with W < 1, ``(1 - W) ·`` each slot against the running statistics ``+ W ·`` the above.

    Args:
        model: the frozen teacher (hooked here; :meth:`remove` unhooks it).
        first_bn_multiplier: the first BN layer's weight.
        slots: K, the chunks per batch.
        statistics: the loaded file of ``delt stats`` (checked against the teacher).
        convention, match, class_weight: as :class:`delt.matching.ClassMatching`.
    """

    def __init__(
        self,
        model: nn.Module,
        first_bn_multiplier: float,
        slots: int,
        statistics: BNStatistics,
        convention: str,
        match: str,
        class_weight: float,
    ) -> None:
        super().__init__(model, first_bn_multiplier, statistics, convention, match, class_weight)
        self.slots = slots
        targets = self._targets
        # class: one row per (slot, class); class-mean: the classes' rows, averaged per batch.
        self._targets = (
            [(mean.repeat(slots, 1), var.repeat(slots, 1)) for mean, var in targets]
            if match == "class"
            else targets
        )
        self._running = [
            (m.running_mean[None].repeat(slots, 1), m.running_var[None].repeat(slots, 1))
            for m in self._modules
        ]
        self._slot_index: Tensor | None = None
        self._group: Tensor | None = None
        self._slot_weight: Tensor | None = None

    def set_batch(self, slot_index: Tensor, labels: Tensor) -> None:
        """Before a forward: the slot (N,) int64 and the class (N,) of every image of the
        batch, on the teacher's device."""
        self._slot_index = slot_index
        # Weights of 1 that require grad: d loss / d weight is each slot's weighted BN loss.
        self._slot_weight = torch.ones(self.slots, device=slot_index.device, requires_grad=True)
        if self.match == "class":
            classes = self._classes
            self._group = slot_index * classes + labels
            counts = torch.bincount(self._group, minlength=self.slots * classes)
            present = (counts > 0).to(torch.float32).view(self.slots, classes)
            # The mean over the classes present in each slot (a slot left out: no classes).
            share = present / present.sum(1, keepdim=True).clamp_min(1)
            self._group_weight = (share * self._slot_weight[:, None]).flatten()
        else:
            count = torch.bincount(slot_index, minlength=self.slots).clamp_min(1)
            scale = count.to(torch.float32)[:, None]
            self._batch_targets = [
                (
                    mean.new_zeros(self.slots, mean.shape[1]).index_add(
                        0, slot_index, mean.index_select(0, labels)
                    )
                    / scale,
                    var.new_zeros(self.slots, var.shape[1]).index_add(
                        0, slot_index, var.index_select(0, labels)
                    )
                    / scale,
                )
                for mean, var in self._targets
            ]

    def _recorder(self, index: int):
        def record(module: nn.Module, args) -> None:
            x = args[0]
            slot_index = self._slot_index
            if slot_index is None or slot_index.shape[0] != x.shape[0]:
                raise RuntimeError(
                    "ChunkClassMatching: set_batch(slot_index, labels) must give the slot and "
                    "class of every image of the batch before the forward pass"
                )
            if self.match == "class":
                mean, var = self._targets[index]
                loss = delt_ext.bn_stat_loss(
                    x, mean, var, group_index=self._group, weight=self._group_weight
                )
            else:
                mean, var = self._batch_targets[index]
                loss = delt_ext.bn_stat_loss(
                    x, mean, var, group_index=slot_index, weight=self._slot_weight
                )
            if self.class_weight < 1:
                mean, var = self._running[index]
                running = delt_ext.bn_stat_loss(
                    x, mean, var, group_index=slot_index, weight=self._slot_weight
                )
                loss = (1 - self.class_weight) * running + self.class_weight * loss
            self._losses[index] = loss

        return record

    def slot_losses(self) -> Tensor:
        """(K,) each slot's share of the backpropagated loss through :meth:`loss` (after the
        backward of ``scale * loss()``: ``scale`` times each slot's BN-statistic loss)."""
        assert self._slot_weight is not None and self._slot_weight.grad is not None
        return self._slot_weight.grad


@dataclass
class ChunkTask:
    """One chunk of a group: as :func:`delt.synthesis.optimize_chunk`'s arguments."""

    init: Tensor  # (B, C, H, W) float32 on the device
    labels: Tensor  # (B,) int64 on the device
    start_iterations: list[int]
    total_iterations: int
    generator: torch.Generator
    frozen: Tensor | None = None  # (F, C, H, W) on the device: joins this chunk's forwards

    @property
    def image_iterations(self) -> int:
        return sum(self.total_iterations - s for s in self.start_iterations)


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def optimize_chunks(
    teacher: nn.Module,
    matching: ChunkSlotMatching | ChunkClassMatching,
    tasks: list[ChunkTask],
    settings: RecoverySettings,
    frozen_sample: int | None = None,
    progress: tqdm | None = None,
) -> list[ChunkResult]:
    """Optimizes K chunks (``tasks``) in one teacher forward and backward per step.

    Step ``t`` is iteration ``t`` of every chunk whose loop (``total_iterations``) is not over;
    a chunk whose loop is over leaves the batch. Per chunk, in this order as
    :func:`delt.synthesis.optimize_chunk` draws them: its active images (EarlyLate), its union
    sample (``frozen``, ``frozen_sample`` of it from its generator), its crop/flip/roll params
    from its generator with its own crop curriculum; the K batches are augmented and forwarded
    as one. The loss is ``sum_k CE_k + r_bn * sum_k BN_k``: each chunk's cross-entropy over its
    own active images (a mean, as apart) and its BN term over its own images and union
    (:class:`ChunkSlotMatching`). One Adam holds the K tensors, one parameter group per loop
    length (their LR at every step), so each tensor keeps its own moments and step count.

    Returns:
        One :class:`ChunkResult` per task; ``seconds``: the group's wall time shared by
        image-iterations. Raises :class:`NonFiniteError` for the first chunk whose loss or
        pixels became non-finite (with ``.chunk``: its position in ``tasks``).
    """
    device = tasks[0].init.device
    start = time.perf_counter()
    count = len(tasks)
    pixels = [task.init.detach().clone().requires_grad_(True) for task in tasks]
    totals = sorted({task.total_iterations for task in tasks})
    groups = [
        {"params": [p for p, t in zip(pixels, tasks, strict=True) if t.total_iterations == total]}
        for total in totals
    ]
    group_totals = totals
    # As delt.synthesis.recovery_adam: the fused kernel on CUDA, foreach on the CPU.
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.Adam(groups, lr=settings.lr, betas=settings.betas, eps=1e-8, **kind)
    size = tuple(tasks[0].init.shape[-2:])
    augments = [
        delt_ext.RandomResizedCropFlip(
            size=size,
            scale=(0.08, 1.0),
            jitter=settings.jitter,
            per_sample=settings.per_sample_aug,
            generator=task.generator,
        )
        for task in tasks
    ]
    active_sets = [ActiveSets(task.start_iterations, device) for task in tasks]
    post_step = settings.post_step.to(device)
    frozen = [None if task.frozen is None else task.frozen.detach() for task in tasks]
    sample = [
        None if f is None or frozen_sample is None or frozen_sample >= f.shape[0] else frozen_sample
        for f in frozen
    ]
    steps = totals[-1]
    # Per chunk, the first iteration whose loss is not finite (its loop length: none) and its
    # last loss, kept on the device (no host sync per step).
    first_bad = torch.tensor([t.total_iterations for t in tasks], device=device)
    last_loss = torch.full((count,), float("nan"), device=device)
    slot_cache: dict[tuple[int, ...], Tensor] = {}
    running = list(range(count))
    for iteration in range(steps):
        finished = [k for k in running if tasks[k].total_iterations <= iteration]
        if finished:
            for k in finished:
                pixels[k].grad = None  # no gradient: Adam skips it
            running = [k for k in running if k not in finished]
        for group, total in zip(optimizer.param_groups, group_totals, strict=True):
            group["lr"] = cosine_lr(min(iteration, total - 1), total, settings.lr)
        batches, params, targets, sizes = [], [], [], []
        for k in running:
            task = tasks[k]
            if settings.crop_curriculum != "fixed":
                augments[k].set_scale(
                    crop_min_scale(iteration, task.total_iterations, settings.crop_curriculum)
                )
            batch, labels = active_sets[k].select(iteration, pixels[k], task.labels)
            active = batch.shape[0]
            context = frozen[k]
            if context is not None:
                if sample[k] is not None:
                    pick = torch.randperm(context.shape[0], generator=task.generator)[: sample[k]]
                    context = context.index_select(0, _to_device(pick, device))
                batch = torch.cat([batch, context])
            rows = augments[k].sample_params(batch.shape[0], size[0], size[1])
            params.append(rows.expand(batch.shape[0], -1) if rows.shape[0] == 1 else rows)
            batches.append(batch)
            targets.append(labels)
            sizes.append((active, batch.shape[0]))
        key = tuple(n for _, n in sizes) + tuple(running)
        if key not in slot_cache:
            slots = torch.cat(
                [
                    torch.full((n,), k, dtype=torch.int64)
                    for k, (_, n) in zip(running, sizes, strict=True)
                ]
            )
            slot_cache[key] = _to_device(slots, device)
        slot_index = slot_cache[key]
        all_labels = torch.cat(
            [
                torch.cat([labels, labels.new_zeros(n - a)]) if n > a else labels
                for labels, (a, n) in zip(targets, sizes, strict=True)
            ]
        )
        inputs = delt_ext.resized_crop_flip(
            torch.cat(batches), _to_device(torch.cat(params), device), size
        )
        if settings.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        matching.set_batch(slot_index, all_labels)
        with autocast(device, settings.amp):
            logits = teacher(inputs)
        ces, offset = [], 0
        for labels, (active, n) in zip(targets, sizes, strict=True):
            ces.append(
                nn.functional.cross_entropy(logits[offset : offset + active].float(), labels)
            )
            offset += n
        ce = torch.stack(ces)
        loss = ce.sum() + settings.r_bn * matching.loss()
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for k in running:
                post_step(pixels[k])
            chunk_loss = ce.detach() + matching.slot_losses()[running]  # r_bn * BN_k
            index = torch.tensor(running, device=device)
            last_loss[index] = chunk_loss
            bad = torch.where(torch.isfinite(chunk_loss), first_bad[index], iteration)
            first_bad[index] = torch.minimum(first_bad[index], bad)
        if progress is not None and not progress.disable:
            progress.update()
            if progress.last_print_n == progress.n or iteration == steps - 1:
                losses = chunk_loss.tolist()
                if not all(math.isfinite(value) for value in losses):
                    k = running[next(i for i, v in enumerate(losses) if not math.isfinite(v))]
                    _raise(k, "loss", int(first_bad[k]), tasks[k].total_iterations)
                progress.set_postfix(
                    loss=f"{sum(losses) / len(losses):.3f}", chunks=len(running), refresh=False
                )
    images = [p.detach().cpu() for p in pixels]
    bad_at = first_bad.tolist()
    losses = last_loss.tolist()
    for k, task in enumerate(tasks):
        if bad_at[k] < task.total_iterations:
            _raise(k, "loss", bad_at[k], task.total_iterations)
        if not bool(torch.isfinite(images[k]).all()):
            _raise(k, "pixels", task.total_iterations, task.total_iterations)
    seconds = time.perf_counter() - start
    work = [task.image_iterations for task in tasks]
    return [
        ChunkResult(images[k], float(losses[k]), seconds * work[k] / sum(work))
        for k in range(count)
    ]


def _raise(chunk: int, what: str, iteration: int, total: int) -> None:
    error = NonFiniteError(what, iteration, total)
    error.chunk = chunk  # type: ignore[attr-defined]
    raise error


class GroupedChunkOptimizer(ChunkOptimizer):
    """A :class:`delt.synthesis.ChunkOptimizer` that optimizes ``chunks_per_step`` chunks at a
    time (:func:`optimize_chunks`; a last group may hold fewer)."""

    def __init__(
        self,
        forward: nn.Module,
        target: ChunkSlotMatching | ChunkClassMatching,
        settings: RecoverySettings,
        device: torch.device,
        iterations: int,
        chunks_per_step: int,
        progress: bool = True,
    ) -> None:
        super().__init__(forward, target, settings, device, iterations, progress)
        self.chunks_per_step = chunks_per_step

    def optimize_group(
        self,
        chunks: list[Chunk],
        ipc: int,
        round_iterations: int,
        inits: list[Tensor],
        generators: list[torch.Generator],
        frozen: list[Tensor | None],
        frozen_sample: int | None,
        desc: str,
    ) -> list[tuple[ChunkResult, list[int]]]:
        """Chunks of a set of ``ipc`` per class from ``inits`` (CPU), in one loop; each
        result with each image's iterations (as :meth:`ChunkOptimizer.optimize`)."""
        tasks, schedules = [], []
        for chunk, init, generator, union in zip(chunks, inits, generators, frozen, strict=True):
            total, starts = chunk_schedule(
                chunk.within_class, ipc, self.iterations, round_iterations
            )
            labels = torch.tensor(chunk.classes, dtype=torch.int64)
            tasks.append(
                ChunkTask(
                    init.to(self.device),
                    labels.to(self.device),
                    starts,
                    total,
                    generator,
                    None if union is None else union.to(self.device),
                )
            )
            schedules.append([total - s for s in starts])
        names = ", ".join(str(chunk.index) for chunk in chunks)
        bar = tqdm(
            total=max(t.total_iterations for t in tasks), desc=f"chunks {names}", leave=False,
            disable=None if self.progress else True,  # None: a bar on a terminal only
        )  # fmt: skip
        try:
            results = optimize_chunks(
                self.forward, self.target, tasks, self.settings, frozen_sample, bar
            )
        except NonFiniteError as error:
            settings, chunk = self.settings, chunks[getattr(error, "chunk", 0)]
            raise ConfigError(
                f"chunk {chunk.index} ({desc}, optimized with chunks {names}): {error}; nothing "
                f"of these chunks was saved. The loss is scaled by --r-bn {settings.r_bn:g} and "
                f"--first-bn-multiplier {self.target.weights[0]:g}, its steps by --lr "
                f"{settings.lr:g}: lower them"
            ) from None
        finally:
            bar.close()
        return list(zip(results, schedules, strict=True))

    def optimize_set(
        self,
        store: ChunkStore,
        chunks: list[Chunk],
        round_iterations: int,
        chunk_seed: Callable[[Chunk], int],
        initial_images: Callable[[Chunk, torch.Generator], Tensor],
        frozen_images: Callable[[Chunk], Tensor | None] | None = None,
        frozen_sample: int | None = None,
        desc: str = "chunks",
    ) -> tuple[Tensor, list[int], float]:
        """As :meth:`ChunkOptimizer.optimize_set`, ``chunks_per_step`` chunks at a time (under
        torchrun: of each rank's own chunks)."""

        def make_group(
            group: list[Chunk], generators: list[torch.Generator]
        ) -> list[tuple[ChunkResult, list[int]]]:
            # Each chunk's initial images from its own generator first, as apart.
            inits = [initial_images(c, g) for c, g in zip(group, generators, strict=True)]
            frozen = [None if frozen_images is None else frozen_images(c) for c in group]
            return self.optimize_group(
                group, store.ipc, round_iterations, inits, generators, frozen, frozen_sample,
                desc,
            )  # fmt: skip

        def make(chunk: Chunk, generator: torch.Generator) -> tuple[ChunkResult, list[int]]:
            return make_group([chunk], [generator])[0]

        return store.make_all(
            chunks, chunk_seed, make, self.progress, desc,
            chunks_per_step=self.chunks_per_step, make_chunks=make_group,
        )  # fmt: skip


@contextmanager
def chunk_optimizer(run: Run, model: nn.Module) -> Iterator[ChunkOptimizer]:
    """The run's chunk optimizer for ``model``: :func:`delt.synthesis.chunk_optimizer` at
    ``--chunks-per-step 1``; else a :class:`GroupedChunkOptimizer`, its teacher frozen on the
    run's device and hooked by a :class:`ChunkSlotMatching` of the running statistics
    (``--match global``) or a :class:`ChunkClassMatching` of the ``--stats`` file (the hooks
    removed on exit); with ``--compile``, compiled after hooking."""
    config = run.config
    slots = config.chunks_per_step
    if slots == 1:
        with one_chunk_optimizer(run, model) as optimizer:
            yield optimizer
        return
    model = frozen_teacher(model, run.device, config.channels_last)
    target: ChunkSlotMatching | ChunkClassMatching
    if config.match == "global":
        target = ChunkSlotMatching(model, config.first_bn_multiplier, slots)
    else:  # --match class / class-mean: each chunk against its own classes' statistics
        assert run.statistics is not None, "--stats is loaded by prepare_run"
        target = ChunkClassMatching(
            model, config.first_bn_multiplier, slots, run.statistics, config.stats_convention,
            config.match, config.match_class_weight,
        )  # fmt: skip
    try:
        forward = torch.compile(model) if config.compile else model
        yield GroupedChunkOptimizer(
            forward, target, run.settings, run.device, config.iterations, slots, config.progress
        )
    finally:
        target.remove()
