import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The tiny models here run small ops where two OpenMP threads only add spin-waits (seconds per
    # call on a busy shared machine); one thread is faster. Restored for the other test modules.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
