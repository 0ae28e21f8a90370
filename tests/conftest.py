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
