"""The one backend resolver (amsa.backends) every op uses: the same choice and the same exception type for
the same condition, whichever op asks."""

import pytest
import torch

import amsa
from amsa.backends import choose_backend


def test_auto_picks_triton_on_cuda_and_torch_elsewhere():
    assert choose_backend("auto", torch.device("cuda"), torch.float32, "op") == "triton"
    assert choose_backend("auto", torch.device("cpu"), torch.float32, "op") == "torch"
    assert choose_backend("auto", torch.device("cuda"), torch.float64, "op") == "torch"  # float64: PyTorch
    assert choose_backend("torch", torch.device("cuda"), torch.float64, "op") == "torch"


def test_explicit_triton_errors():
    with pytest.raises(TypeError, match="op: backend='triton' takes float32, float16 or bfloat16"):
        choose_backend("triton", torch.device("cuda"), torch.float64, "op")
    with pytest.raises(ValueError, match="op: backend must be 'auto', 'torch' or 'triton', got 'cuda'"):
        choose_backend("cuda", torch.device("cpu"), torch.float32, "op")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from kernels import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        choose_backend("triton", torch.device("cpu"), torch.float32, "op")


def test_every_op_raises_the_same_type_for_the_same_condition(monkeypatch):
    from kernels import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    q = torch.randn(1, 2, 8, 8)
    w = torch.randn(2, 2, 3, 3)
    off = torch.zeros(1, 18, 8, 8)
    calls = {
        "cfe_patchmatch": lambda b: amsa.cfe_patchmatch(q, q, (1,), backend=b),
        "deform_conv2d": lambda b: amsa.deform_conv2d(q, off, w, padding=1, backend=b),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name}: backend='triton' needs CUDA tensors"):
            call("triton")
        with pytest.raises(ValueError, match=f"{name}: backend must be"):
            call("gpu")
