"""Test set-up shared by the whole suite.

CI has no GPU, so the Triton kernels run on CPU tensors under Triton's interpreter. The interpreter must
be switched on before any ``@triton.jit`` decorator runs, hence before ``din_kernels`` is imported.
The suite's default backend is the C++ CPU op, what CPU users run (the interpreter is far too slow for
model and CLI tests); kernel tests ask for every path explicitly through the ``backend`` fixture (Triton
under the interpreter, the C++ op, the torch composite path; ops without a C++ op run their torch path
under "cpp").

``DIN_TEST_DEVICE=cuda`` (used by ``benchmarks/gpu_check.sh`` with ``TRITON_INTERPRET=0``) makes CUDA the
default device of every tensor the tests create, so the same tests run the real Triton kernels on a GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DIN_KERNELS_BACKEND", "cpp")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import din_kernels as dk  # noqa: E402

if os.environ.get("DIN_TEST_DEVICE"):
    torch.set_default_device(os.environ["DIN_TEST_DEVICE"])

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# Every path in CI, which builds the C++ ops (a missing build fails there). Only a GPU image without a C++
# compiler (benchmarks/gpu_check.sh sets DIN_TEST_DEVICE) leaves "cpp" out.
BACKENDS = ["triton", "torch"] if os.environ.get("DIN_TEST_DEVICE") and not dk.cpu_op_available() else \
    ["triton", "cpp", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test on the Triton kernels (interpreter on CPU), the C++ op and the composite path."""
    previous = dk.get_backend()
    dk.set_backend(request.param)
    yield request.param
    dk.set_backend(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data():
    """The read-only real data sets beside the checkout; absent for users of the package."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    return SHARED_DATA
