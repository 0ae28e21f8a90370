import pytest
import torch

CUDA = torch.cuda.is_available()

# Every test that needs a GPU is marked `cuda` (`pytest -m cuda` runs them all: `make gpu-check`,
# docs/gpu-check.md); without a GPU the hook below skips them.
requires_cuda = pytest.mark.cuda

# Devices every kernel test runs on: CPU always, CUDA when a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------------
# Kernel test cases shared by the CPU, CUDA and CUDA-emulation tests.

# (N, C, H, W) covering: whole-plane chunks, split planes (H*W > 4096, with a partial piece),
# a single value per channel, channel counts that are not multiples of the vector widths.
BN_SHAPES = [
    (8, 16, 9, 7),
    (2, 3, 65, 70),
    (3, 5, 64, 64),
    (1, 6, 1, 1),
    (4, 37, 5, 5),
    (2, 130, 3, 3),
    (64, 3, 2, 2),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BN_LAYOUTS = ["nchw", "channels_last", "strided"]
# Relative tolerance of gradients (output rounding dominates for 16-bit types).
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Crop boxes (top, left, height, width) in a CROP_H x CROP_W image: the full image, 1x1 boxes in
# every corner and the middle, strips touching each border, an interior box, one-pixel-wide rows
# and columns.
CROP_H, CROP_W = 13, 17
CROP_BOXES = [
    (0, 0, CROP_H, CROP_W),
    (0, 0, 1, 1),
    (0, CROP_W - 1, 1, 1),
    (CROP_H - 1, 0, 1, 1),
    (CROP_H - 1, CROP_W - 1, 1, 1),
    (6, 8, 1, 1),
    (0, 0, 3, CROP_W),
    (CROP_H - 3, 0, 3, CROP_W),
    (0, 0, CROP_H, 2),
    (0, CROP_W - 2, CROP_H, 2),
    (3, 4, 5, 6),
    (0, 5, CROP_H, 1),
    (6, 0, 1, CROP_W),
]


@pytest.fixture
def num_threads():
    """Lets a test change torch's intra-op thread count and restores it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def count_calls(monkeypatch, module, name, die_after=None):
    """Replaces ``module.name`` with a wrapper that appends to the returned list at each call
    that runs the original; with ``die_after=k`` the call after the k-th raises
    KeyboardInterrupt (a simulated kill). Wrapping again wraps the original, not the wrapper."""
    original = getattr(module, name)
    original = getattr(original, "counted", original)
    calls = []

    def wrapper(*args, **kwargs):
        if die_after is not None and len(calls) == die_after:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return original(*args, **kwargs)

    wrapper.counted = original
    monkeypatch.setattr(module, name, wrapper)
    return calls


# --------------------------------------------------------------------------------------------
# delt (orchestration) fixtures: a tiny synthetic dataset, teacher and selection, built once.

SYNTHETIC = "synthetic:classes=4,channels=3,size=8,train=12,test=4"


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A ConvNet-2 of width 8 trained for one epoch on ``SYNTHETIC``: (path, TeacherResult)."""
    from delt.teacher import TeacherConfig, train_teacher

    out = tmp_path_factory.mktemp("teacher")
    config = TeacherConfig(
        out=str(out), dataset=SYNTHETIC, arch="convnet2", width=8, epochs=1, batch_size=16,
        amp="none", channels_last=False, progress=False,
    )  # fmt: skip
    return train_teacher(config)


@pytest.fixture(scope="session")
def tiny_selection(tmp_path_factory, tiny_teacher):
    """``delt select --strategy medium --ipc 5`` with the tiny teacher: the output folder."""
    from delt.select import SelectConfig, select_images

    out = tmp_path_factory.mktemp("select")
    select_images(SelectConfig(teacher=str(tiny_teacher.path), ipc=5, out=str(out), progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_set(tiny_teacher, tmp_path_factory):
    """A CDA recovery of IPC 2 with the tiny teacher (4 classes of 8x8 images): the folder.

    Its ``chunks/`` are kept (``keep_chunks``), so tests can also model an unfinished run."""
    from delt.recover import RecoverConfig, recover

    out = tmp_path_factory.mktemp("cda")
    recover(
        RecoverConfig(
            teacher=str(tiny_teacher.path), ipc=2, out=str(out), method="cda", iterations=4,
            progress=False, keep_chunks=True,
        )
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def three_class_teacher(tmp_path_factory):
    """A teacher of another dataset (``SYNTHETIC`` with 3 classes), for mismatch errors."""
    from delt.teacher import TeacherConfig, train_teacher

    return train_teacher(
        TeacherConfig(
            out=str(tmp_path_factory.mktemp("teacher3")),
            dataset=SYNTHETIC.replace("classes=4", "classes=3"), arch="convnet1", width=4,
            epochs=1, batch_size=16, amp="none", channels_last=False, progress=False,
        )
    )  # fmt: skip
