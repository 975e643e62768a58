import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # for `import helpers`


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not any node named "gpu" (tests/gpu/)
            item.add_marker(skip_gpu)
