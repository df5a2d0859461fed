"""One selection rule for every op (``_backend.select_path``): what each backend gives on CPU tensors."""
import pytest
import torch

import din_kernels as dk
from din_kernels.testing import select_path

from conftest import BACKENDS


@pytest.mark.parametrize("name", BACKENDS)
def test_select_path_follows_the_backend(name):
    x = torch.empty(2, 3)
    previous = dk.get_backend()
    try:
        dk.set_backend(name)
        want = {"triton": "triton", "cpp": "cpp", "torch": "torch"}[name]
        assert select_path(x, cpp=True) == want
        # an op without a C++ path (MBA) runs the composite where the C++ op would have run
        assert select_path(x, cpp=False) == ("torch" if want == "cpp" else want)
    finally:
        dk.set_backend(previous)
