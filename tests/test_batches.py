"""delt.batches: a dataset's batches (in memory and through a DataLoader) and a model's top-1
accuracy on it."""

import torch
from delt.batches import evaluate_accuracy, iterate_batches
from delt.data import ImageDataset, TensorImageDataset
from delt.models import load_checkpoint


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
