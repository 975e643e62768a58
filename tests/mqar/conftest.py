import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: several intra-op threads only wait on each other (badly so on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
