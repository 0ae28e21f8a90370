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


@pytest.fixture(scope="session")
def tiny_set(tiny_teacher, tmp_path_factory):
    """A CDA recovery of IPC 2 with the tiny teacher (4 classes of 8x8 images): the folder."""
    from delt.recover import RecoverConfig, recover

    out = tmp_path_factory.mktemp("cda")
    recover(
        RecoverConfig(
            teacher=str(tiny_teacher.path), ipc=2, out=str(out), method="cda", iterations=4,
            progress=False,
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
