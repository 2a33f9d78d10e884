"""Test set-up: without a GPU, Triton kernels run in the interpreter. TRITON_INTERPRET must be set
before triton is first imported, so it is set here, before any test module imports amsa."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Devices the Triton kernels can be tested on: CUDA when present, else CPU through the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
