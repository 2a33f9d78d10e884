"""Where the Triton kernels are tested: CUDA when present, else CPU through the interpreter (conftest.py
sets TRITON_INTERPRET=1 before anything imports triton)."""

import pytest
import torch

from amsa.backends import interpreting

HAS_CUDA = torch.cuda.is_available()
INTERPRET = interpreting()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

needs_triton = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
