"""delt.batches: a dataset's batches (in memory and through a DataLoader) and a model's top-1
accuracy on it."""

import torch
from delt.batches import evaluate_accuracy, inference_copy, iterate_batches
from delt.data import ImageDataset, TensorImageDataset
from delt.models import ConvNet, load_checkpoint


class _OneByOne(ImageDataset):
    """The same images read one at a time: the file-backed path (a DataLoader)."""

    def __init__(self, dataset: TensorImageDataset) -> None:
        self.info, self.targets, self.dataset = dataset.info, dataset.targets, dataset

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[index]


def _dataset(tiny_teacher) -> TensorImageDataset:
    info = load_checkpoint(tiny_teacher.path).info
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8, generator=generator)
    return TensorImageDataset(info, pixels, torch.arange(7) % 4)


def _joined(batches):
    images, labels = zip(*batches, strict=True)
    return torch.cat(images), torch.cat(labels)


def test_batches_in_order_shuffled_or_of_given_indices(tiny_teacher):
    dataset = _dataset(tiny_teacher)
    for source in (dataset, _OneByOne(dataset)):
        batches = list(iterate_batches(source, 3))
        assert [labels.shape[0] for _, labels in batches] == [3, 3, 1]
        images, labels = _joined(batches)
        assert torch.equal(images, dataset.images(range(7)))
        assert torch.equal(labels, dataset.targets) and labels.dtype == torch.int64
        shuffled = iterate_batches(source, 3, True, torch.Generator().manual_seed(1))
        order = torch.randperm(7, generator=torch.Generator().manual_seed(1))
        assert torch.equal(_joined(shuffled)[0], dataset.images(order))
        picked = iterate_batches(source, 2, indices=torch.tensor([5, 1, 6]))
        assert torch.equal(_joined(picked)[1], dataset.targets[[5, 1, 6]])


def test_accuracy_counts_the_top_1_hits_and_leaves_the_model_in_eval_mode(tiny_teacher):
    dataset = _dataset(tiny_teacher)  # labels 0 1 2 3 0 1 2
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))  # always class 1
    model.train()
    accuracy = evaluate_accuracy(model, dataset, torch.device("cpu"), batch_size=3)
    assert accuracy == 100.0 * 2 / 7 and not model.training


def _trained_student(seed: int) -> torch.nn.Module:
    """A ConvNet-2 of width 8 on 8x8 RGB images, 30 SGD steps on random data: BatchNorm's
    running statistics and affine parameters far from their initial values."""
    torch.manual_seed(seed)
    model = ConvNet(4, 3, 8, depth=2, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = torch.randn(64, 3, 8, 8) * 2 + 0.5, torch.randint(0, 4, (64,))
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_folded_copy_predicts_like_the_model_except_on_near_ties():
    test_images = torch.randn(400, 3, 8, 8, generator=torch.Generator().manual_seed(9)) * 2
    disagreements = 0
    for seed in range(4):
        model = _trained_student(seed).train()
        before = {name: value.clone() for name, value in model.state_dict().items()}
        folded = inference_copy(model, channels_last=True)
        # The model is untouched: same mode, parameters, statistics, memory format.
        assert model.training
        assert all(torch.equal(before[name], v) for name, v in model.state_dict().items())
        assert model.features[0].weight.is_contiguous()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        model.eval()
        with torch.no_grad():
            reference = model(test_images)
            logits = folded(test_images.contiguous(memory_format=torch.channels_last))
        scale = reference.abs().max()
        assert (logits - reference).abs().max() <= 1e-5 * scale
        differ = reference.argmax(1) != logits.argmax(1)
        top2 = reference.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        assert (margin[differ] <= 2e-5 * scale).all()
        disagreements += int(differ.sum())
    assert disagreements <= 2  # of 1600 predictions


def test_accuracy_of_the_folded_pass_equals_the_unfolded_models(tiny_teacher):
    info = load_checkpoint(tiny_teacher.path).info
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (250, 3, 8, 8), dtype=torch.uint8, generator=generator)
    dataset = TensorImageDataset(info, pixels, torch.randint(0, 4, (250,), generator=generator))
    for seed in range(3):
        model = _trained_student(seed).eval()
        with torch.no_grad():
            hits = (model(dataset.images(range(250))).argmax(1) == dataset.targets).sum()
        expected = 100.0 * int(hits) / 250
        for batch_size in (None, 7):
            accuracy = evaluate_accuracy(model, dataset, torch.device("cpu"), batch_size)
            assert accuracy == expected


class _Branching(torch.nn.Module):
    """A forward that torch.fx cannot trace (control flow on a tensor's value)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)


def test_an_untraceable_model_is_tested_unfolded():
    model = _Branching().eval()
    copy = inference_copy(model, channels_last=False)
    assert copy is not model and isinstance(copy.norm, torch.nn.BatchNorm2d)
    images = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(copy(images), model(images))
