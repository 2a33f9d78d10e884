"""Test set-up: without a GPU, Triton kernels run in the interpreter. TRITON_INTERPRET must be set
before triton is first imported, so it is set here, before any test module imports the kernels.

``AMSA_TEST_THREADS`` sets torch's thread count (CI and developers run the suite with 1 and 2 threads:
results must not depend on it)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("AMSA_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["AMSA_TEST_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison(monkeypatch):
    """Kernel outputs start as garbage (NaN, -7): every element must be written by the kernel."""
    from kernels import _outputs

    monkeypatch.setattr(_outputs, "POISON_OUTPUTS", True)
