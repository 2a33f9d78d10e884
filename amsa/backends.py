"""Backends of the library's ops (``backend=`` keyword), and the one resolver every op uses.

``"torch"``: the PyTorch paths (any device, any float dtype; the references the kernels are tested
against). ``"triton"``: the Triton kernels of ``kernels/`` (CUDA tensors of a kernel dtype; on CPU only
under ``TRITON_INTERPRET=1``, set before triton is imported, for tests). ``"numba"``: the fused CPU
kernels of ``kernels/cpu_*.py`` (CPU tensors; float32, float16 and bfloat16 features are computed in
float32, float64 in float64). ``"auto"``: Triton on a GPU, numba on CPU tensors, except float64, which
stays on the PyTorch path (the reference dtype, as on GPU); where numba cannot be imported, ``"auto"``
falls back to the PyTorch path with one warning. :func:`triton_unavailable` and
:func:`numba_unavailable` tell whether (and why not) the kernels can run on given tensors.
"""

from __future__ import annotations

import warnings

import torch

from amsa._checks import FEATURE_DTYPES

BACKENDS = ("auto", "torch", "triton", "numba")
#: Floating-point dtypes the Triton kernels take (kept here, not in ``kernels._common``: checking them must
#: not import triton). The CPU kernels take :data:`amsa._checks.FEATURE_DTYPES`.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_common = None  # kernels._common once imported; False where Triton is not available
_cpu = None  # kernels._cpu once imported; else why it could not be (a string)
_warned_fallback = False


def _kernels():
    """``kernels._common``, imported on first use (so ``import amsa`` does not import triton, and a CLI can
    still choose the interpreter), or None where Triton is not available: the PyTorch paths still work."""
    global _common
    if _common is None:
        try:
            from kernels import _common as common
        except ImportError:
            common = False
        _common = common
    return _common or None


def _cpu_kernels():
    """``kernels._cpu`` (numba), imported on first use, or None where numba cannot be imported."""
    global _cpu
    if _cpu is None:
        try:
            from kernels import _cpu as cpu
        except Exception as e:  # ImportError, or numba/llvmlite failing to load (version, platform)
            cpu = f"{type(e).__name__}: {e}"
        _cpu = cpu
    return None if isinstance(_cpu, str) else _cpu


def interpreting() -> bool:
    """Whether the Triton kernels run in the interpreter (TRITON_INTERPRET=1 when they were imported)."""
    return _kernels() is not None and _kernels().INTERPRET


def check_backend(backend: str, what: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be 'auto', 'torch', 'triton' or 'numba', got {backend!r}")
    return backend


def triton_unavailable(device: torch.device, dtype: torch.dtype) -> tuple[type[Exception], str] | None:
    """Why the Triton kernels cannot run on tensors of ``device`` and ``dtype`` (exception type and
    message), or None if they can."""
    common = _kernels()
    if common is None:
        return RuntimeError, "backend='triton' but Triton is not available"
    if dtype not in TRITON_DTYPES:
        return TypeError, f"backend='triton' takes float32, float16 or bfloat16, got {dtype}"
    if device.type != "cuda" and not common.INTERPRET:
        return ValueError, ("backend='triton' needs CUDA tensors (on CPU only with TRITON_INTERPRET=1, set "
                            "before triton is imported, for tests)")
    return None


def numba_unavailable(device: torch.device, dtype: torch.dtype) -> tuple[type[Exception], str] | None:
    """Why the CPU kernels cannot run on tensors of ``device`` and ``dtype`` (exception type and message),
    or None if they can."""
    if _cpu_kernels() is None:
        return RuntimeError, (f"backend='numba' but numba cannot be imported ({_cpu}); install it "
                              "(pip install numba) or use backend='torch'")
    if device.type != "cpu":
        return ValueError, f"backend='numba' needs CPU tensors, got {device.type} tensors"
    if dtype not in FEATURE_DTYPES:
        return TypeError, f"backend='numba' takes float32, float16, bfloat16 or float64, got {dtype}"
    return None


def _auto_cpu(dtype: torch.dtype) -> str:
    """``"auto"`` on CPU: numba, except for float64 (the PyTorch reference path) or without numba (one
    warning per process)."""
    global _warned_fallback
    if dtype == torch.float64 or dtype not in FEATURE_DTYPES:
        return "torch"
    if _cpu_kernels() is not None:
        return "numba"
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"amsa: numba cannot be imported ({_cpu}); CPU ops run on the PyTorch path, "
                      "5-20x slower. Install numba (pip install numba) for the fused CPU kernels.",
                      RuntimeWarning, stacklevel=3)
    return "torch"


def choose_backend(backend: str, device: torch.device, dtype: torch.dtype, what: str) -> str:
    """The backend that runs: ``"torch"``, ``"triton"`` or ``"numba"``. An explicit backend that cannot run
    on these tensors raises (``what`` names the op in the message); ``"auto"``: module docstring."""
    check_backend(backend, what)
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_unavailable(device, dtype) is None else "torch"
        return _auto_cpu(dtype) if device.type == "cpu" else "torch"
    unavailable = {"triton": triton_unavailable, "numba": numba_unavailable}.get(backend)
    reason = unavailable and unavailable(device, dtype)
    if reason:
        raise reason[0](f"{what}: {reason[1]}")
    return backend
