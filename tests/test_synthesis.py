"""delt.synthesis: one chunk's loop (EarlyLate masking, the union in the batch, the crop
curriculum in the settings) and run setup."""

import io

import pytest
import torch
from delt.data import DatasetInfo
from delt.method import clamp_to_pixel_range
from delt.models import build_model
from delt.synthesis import ActiveSets, RecoverySettings, optimize_chunk, recovery_adam
from tqdm import tqdm

import delt_ext


def _settings(info, curriculum="cosine"):
    post_step = clamp_to_pixel_range(info)
    return RecoverySettings(0.25, (0.5, 0.9), 0.01, curriculum, 0, False, "none", False, post_step)


def test_late_images_are_untouched_until_they_join():
    info = DatasetInfo("t", 2, 3, 8, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    torch.manual_seed(0)
    teacher = build_model("convnet1", info, {"width": 4}).eval().requires_grad_(False)
    teacher(torch.randn(1, 3, 8, 8))
    settings = _settings(info)
    init = torch.rand(4, 3, 8, 8)
    with delt_ext.BNStatMatching(teacher) as bn_matching:
        # Rows 2 and 3 would join at iteration 6 of a 6-iteration loop: never forwarded.
        result = optimize_chunk(
            teacher, bn_matching, init, torch.tensor([0, 1, 0, 1]), [0, 0, 6, 6], 6, settings,
            torch.Generator().manual_seed(0),
        )  # fmt: skip
    assert torch.equal(result.images[2:], init[2:])
    assert not torch.equal(result.images[:2], init[:2])


class _Recorder(torch.nn.Module):
    """Runs the teacher and keeps every input batch and BNStatMatching's per-layer losses."""

    def __init__(self, teacher, bn_matching):
        super().__init__()
        self.teacher, self.bn_matching = teacher, bn_matching
        self.inputs, self.layer_losses = [], []

    def forward(self, x):
        logits = self.teacher(x)
        self.inputs.append(x.detach().clone())
        self.layer_losses.append(
            [loss.detach().clone() for loss in self.bn_matching.layer_losses()]
        )
        return logits


def _manual_layer_losses(teacher, x):
    """SRe2L's per-layer ||mean - running_mean||_2 + ||var - running_var||_2, by hand."""
    inputs = []
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    handles = [bn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for bn in bns]
    with torch.no_grad():
        teacher(x)
    for handle in handles:
        handle.remove()
    losses = []
    for bn, value in zip(bns, inputs, strict=True):
        mean = value.mean(dim=(0, 2, 3))
        var = value.var(dim=(0, 2, 3), unbiased=False)
        losses.append(torch.norm(mean - bn.running_mean) + torch.norm(var - bn.running_var))
    return losses


@pytest.mark.parametrize("frozen_sample", [None, 3])
def test_union_in_batch_matches_the_bn_statistics_of_the_union(frozen_sample):
    info = DatasetInfo("t", 2, 3, 8, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    torch.manual_seed(0)
    teacher = build_model("convnet2", info, {"width": 4})
    teacher.train()
    teacher(torch.randn(64, 3, 8, 8) * 2 + 1)  # running statistics that are not 0/1
    teacher.eval().requires_grad_(False)
    settings = _settings(info)
    init = torch.rand(2, 3, 8, 8)
    frozen = torch.rand(6, 3, 8, 8) * 0.3 - 1.0  # other statistics than the new images'
    frozen_before = frozen.clone()
    with delt_ext.BNStatMatching(teacher) as bn_matching:
        recorder = _Recorder(teacher, bn_matching)
        result = optimize_chunk(
            recorder, bn_matching, init, torch.tensor([0, 1]), [0, 0], 4, settings,
            torch.Generator().manual_seed(0), frozen=frozen, frozen_sample=frozen_sample,
        )  # fmt: skip
    union_size = 2 + (frozen_sample or 6)
    assert [x.shape[0] for x in recorder.inputs] == [union_size] * 4
    # Iteration 0 crops the whole image (curriculum scale 1): the batch is the new images, then
    # the frozen ones, under one shared flip.
    first = recorder.inputs[0]
    flip = torch.equal(first[:2], init.flip(3))
    assert flip or torch.equal(first[:2], init)
    frozen_view = frozen.flip(3) if flip else frozen
    for row in first[2:]:
        assert any(torch.equal(row, candidate) for candidate in frozen_view)
    if frozen_sample is None:
        assert torch.equal(first[2:], frozen_view)
    # Every step's BN losses are those of the whole union batch, not of the new images alone.
    for x, recorded in zip(recorder.inputs, recorder.layer_losses, strict=True):
        manual = _manual_layer_losses(teacher, x)
        new_only = _manual_layer_losses(teacher, x[:2])
        for got, want, alone in zip(recorded, manual, new_only, strict=True):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(got, alone, rtol=1e-2)
    # Gradients reach the new images only: the frozen ones are bitwise unchanged.
    assert torch.equal(frozen, frozen_before)
    assert not torch.equal(result.images, init)


@pytest.mark.parametrize(
    "curriculum, expected",
    [("fixed", [0.08] * 4), ("full", [1.0] * 4),
     ("cosine", [delt_ext.crop_scale_schedule(i, 4) for i in range(4)])],
)  # fmt: skip
def test_the_crop_curriculum_comes_from_the_settings(monkeypatch, curriculum, expected):
    # The loop's minimum crop scale at each step is the settings' curriculum: a variant such
    # as the IPC-1 ablation's whole-image crop needs no patching of delt_ext.
    info = DatasetInfo("t", 2, 3, 8, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    torch.manual_seed(0)
    teacher = build_model("convnet1", info, {"width": 4}).eval().requires_grad_(False)
    scales = []
    original = delt_ext.RandomResizedCropFlip.forward

    def record(self, images):
        scales.append(self.scale[0])
        return original(self, images)

    monkeypatch.setattr(delt_ext.RandomResizedCropFlip, "forward", record)
    with delt_ext.BNStatMatching(teacher) as bn_matching:
        optimize_chunk(
            teacher, bn_matching, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), [0, 0], 4,
            _settings(info, curriculum), torch.Generator().manual_seed(0),
        )  # fmt: skip
    assert scales == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# The loop's overheads (issue 14): active sets without copies or syncs, one-kernel Adam,
# the loss read only when the bar redraws, a compiled teacher in one graph.


def test_active_sets_are_views_where_the_active_images_are_a_prefix():
    pixels = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    labels = torch.arange(5)
    starts = [0, 2, 0, 4, 4]  # 2 classes in a chunk: {0, 2} active first, not a prefix
    active_sets = ActiveSets(starts, torch.device("cpu"))
    for iteration in range(6):
        batch, targets = active_sets.select(iteration, pixels, labels)
        want = [i for i, s in enumerate(starts) if s <= iteration]
        assert targets.tolist() == want and batch[:, 0, 0, 0].tolist() == want
        if iteration >= 4:  # everything active: the tensor itself
            assert batch is pixels
    one_class = ActiveSets([0, 0, 3, 6], torch.device("cpu"))
    for iteration, count in [(0, 2), (2, 2), (3, 3), (5, 3), (6, 4)]:
        batch, targets = one_class.select(iteration, pixels[:4], labels[:4])
        assert targets.tolist() == list(range(count))
        assert batch.data_ptr() == pixels.data_ptr() and batch.shape[0] == count  # a view


def test_adam_is_foreach_on_the_cpu():
    # foreach gives the default loop's bits on the CPU (the fused CPU kernel does not).
    info = DatasetInfo("t", 2, 3, 8, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    optimizer = recovery_adam([torch.zeros(2, requires_grad=True)], _settings(info))
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
    assert optimizer.defaults["betas"] == (0.5, 0.9) and optimizer.defaults["eps"] == 1e-8
    assert optimizer.defaults["lr"] == 0.25


def test_loss_is_read_when_the_bar_redraws_only(monkeypatch):
    info = DatasetInfo("t", 2, 3, 8, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    torch.manual_seed(0)
    teacher = build_model("convnet1", info, {"width": 4}).eval().requires_grad_(False)
    init = torch.rand(4, 3, 8, 8)
    reads = []
    original = torch.Tensor.item

    def counting_item(self):
        if self.grad_fn is not None:  # the loss (Adam's CPU step counters are read too)
            reads.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)

    def run(bar):
        reads.clear()
        with delt_ext.BNStatMatching(teacher) as bn_matching:
            result = optimize_chunk(
                teacher, bn_matching, init, torch.tensor([0, 1, 0, 1]),
                [0, 0, 3, 3], 30, _settings(info), torch.Generator().manual_seed(0), bar,
            )  # fmt: skip
        return result, len(reads)

    silent, silent_reads = run(tqdm(total=30, disable=True))
    assert silent_reads == 1 and silent.loss == silent.loss  # once, after the loop (not NaN)
    stream = io.StringIO()
    bar = tqdm(total=30, file=stream, mininterval=3600)
    shown, shown_reads = run(bar)
    bar.close()
    # A bar that never redraws within the hour: the last iteration reads the loss for the
    # final display, then once more after the loop.
    assert shown_reads == 2 and "loss=" in stream.getvalue()
    # A bar that redraws at every update: every iteration reads it.
    _, every_reads = run(tqdm(total=30, file=io.StringIO(), mininterval=0, miniters=1))
    assert every_reads == 31
    assert torch.equal(silent.images, shown.images)


@pytest.mark.parametrize("arch", ["convnet2", "resnet18_small"])
def test_hooked_teacher_compiles_to_one_graph(arch):
    info = DatasetInfo("t", 3, 3, 16, (0.5,) * 3, (0.25,) * 3, ("a", "b", "c"))
    torch.manual_seed(0)
    teacher = build_model(arch, info).eval().requires_grad_(False)
    x = torch.randn(4, 3, 16, 16)
    with delt_ext.BNStatMatching(teacher) as bn_matching:
        explained = torch._dynamo.explain(teacher)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, (
            explained.break_reasons
        )
        counter = torch._dynamo.testing.CompileCounter()
        compiled = torch.compile(teacher, backend=counter, fullgraph=True)
        eager_logits = teacher(x)
        eager_loss = bn_matching.loss()
        logits = compiled(x)
        # The hooks' losses come out of the graph: the same values as the eager forward's.
        torch.testing.assert_close(bn_matching.loss(), eager_loss)
        torch.testing.assert_close(logits, eager_logits)
        assert counter.frame_count == 1


@pytest.mark.cuda
@pytest.mark.parametrize("per_sample_aug", [False, True])
def test_the_cuda_loop_never_waits_for_the_device(per_sample_aug):
    info = DatasetInfo("t", 2, 3, 16, (0.5,) * 3, (0.25,) * 3, ("a", "b"))
    torch.manual_seed(0)
    device = torch.device("cuda")
    teacher = build_model("convnet2", info, {"width": 8}).eval().requires_grad_(False).to(device)
    low, high = info.pixel_bounds()
    settings = RecoverySettings(
        0.25, (0.5, 0.9), 0.01, "cosine", 2, per_sample_aug, "none", False, low, high
    )
    total = 6

    class Strict(torch.nn.Module):
        """Turns a host synchronization into an error from the first forward on."""

        def forward(self, x):
            torch.cuda.set_sync_debug_mode("error")
            return teacher(x)

    class Bar:
        # Stands in for a tqdm bar that never redraws; the last update lifts the strict mode,
        # so that the loop's final loss read (for the bar) and the result copy may wait.
        disable, n, last_print_n = False, 0, -1

        def update(self):
            self.n += 1
            if self.n == total:
                torch.cuda.set_sync_debug_mode("default")

        def set_postfix(self, **kwargs):
            pass

    try:
        with delt_ext.BNStatMatching(teacher) as bn_matching:
            result = optimize_chunk(
                Strict(), bn_matching, torch.rand(4, 3, 16, 16, device=device),
                torch.tensor([0, 1, 0, 1], device=device), [0, 2, 0, 4], total, settings,
                torch.Generator().manual_seed(0), Bar(),
            )  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.images.shape == (4, 3, 16, 16)
