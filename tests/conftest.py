import pytest
import torch

CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Devices every kernel test runs on: CPU always, CUDA when a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture
def num_threads():
    """Lets a test change torch's intra-op thread count and restores it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


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
