"""The one backend resolver (amsa.backends) every op uses: the same choice and the same exception type for
the same condition, whichever op asks; the fallback to the PyTorch path where numba cannot be imported."""

import subprocess
import sys
import warnings

import pytest
import torch

import amsa
from amsa import backends
from amsa.backends import choose_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_picks_triton_on_cuda_numba_on_cpu_and_torch_for_float64():
    assert choose_backend("auto", CUDA, torch.float32, "op") == "triton"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert choose_backend("auto", CPU, dtype, "op") == "numba"
    assert choose_backend("auto", CUDA, torch.float64, "op") == "torch"  # float64: the PyTorch reference
    assert choose_backend("auto", CPU, torch.float64, "op") == "torch"
    assert choose_backend("torch", CUDA, torch.float64, "op") == "torch"
    assert choose_backend("numba", CPU, torch.float64, "op") == "numba"  # explicitly: any float dtype


def test_explicit_triton_errors():
    with pytest.raises(TypeError, match="op: backend='triton' takes float32, float16 or bfloat16"):
        choose_backend("triton", CUDA, torch.float64, "op")
    with pytest.raises(ValueError, match="op: backend must be 'auto', 'torch', 'triton' or 'numba', got 'cu"):
        choose_backend("cuda", CPU, torch.float32, "op")


def test_explicit_numba_errors():
    with pytest.raises(ValueError, match="op: backend='numba' needs CPU tensors, got cuda tensors"):
        choose_backend("numba", CUDA, torch.float32, "op")
    with pytest.raises(TypeError, match="op: backend='numba' takes float32, float16, bfloat16 or float64"):
        choose_backend("numba", CPU, torch.int32, "op")


def test_without_numba_auto_falls_back_with_one_warning_and_explicit_numba_raises(monkeypatch):
    monkeypatch.setattr(backends, "_cpu", "ImportError: No module named 'numba'")
    monkeypatch.setattr(backends, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="numba cannot be imported .*No module named 'numba'.*PyTorch"):
        assert choose_backend("auto", CPU, torch.float32, "op") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning per process
        assert choose_backend("auto", CPU, torch.float16, "op") == "torch"
        assert choose_backend("auto", CPU, torch.float64, "op") == "torch"
    with pytest.raises(RuntimeError, match="op: backend='numba' but numba cannot be imported .*No module"):
        choose_backend("numba", CPU, torch.float32, "op")


_NO_NUMBA = r"""
import sys, warnings
sys.modules["numba"] = None  # `import numba` raises ImportError, as where it is not installed
import torch, amsa
from amsa.deform import deform_conv2d_torch
q, r = torch.randn(1, 3, 12, 11), torch.randn(1, 3, 10, 13)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    m = amsa.cfe_patchmatch(q, r, iters=(1, 1))
    off, w = torch.randn(1, 18, 12, 11), torch.randn(2, 3, 3, 3)
    out = amsa.deform_conv2d(q, off, w, padding=1)
t = amsa.cfe_patchmatch(q, r, iters=(1, 1), backend="torch")
ok = torch.equal(m.pos, t.pos) and torch.equal(out, deform_conv2d_torch(q, off, w, padding=1))
print(len([w for w in caught if "numba cannot be imported" in str(w.message)]), ok)
try:
    amsa.cfe_patchmatch(q, r, iters=(1,), backend="numba")
except RuntimeError as e:
    print(e)
"""


def test_without_numba_installed_everything_runs_on_the_pytorch_path():
    """A process where numba cannot be imported: cfe_patchmatch and deform_conv2d run (the PyTorch path,
    bitwise the same positions), one warning in all; backend='numba' raises, naming why."""
    proc = subprocess.run([sys.executable, "-c", _NO_NUMBA], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "1 True", proc.stdout
    want = "cfe_patchmatch: backend='numba' but numba cannot be imported (ModuleNotFoundError: import of"
    assert want in lines[1]


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
        call("numba")  # CPU tensors: runs
