"""Backends of the library's ops (``backend=`` keyword), and the one resolver every op uses.

``"torch"``: the PyTorch paths (any device, any float dtype; the references the kernels are tested
against). ``"triton"``: the Triton kernels of ``kernels/`` (CUDA tensors of a kernel dtype; on CPU only
under ``TRITON_INTERPRET=1``, set before triton is imported, for tests). ``"auto"``: Triton where it can
run on a GPU, PyTorch otherwise. :func:`triton_unavailable` tells whether (and why not) the kernels can
run on given tensors.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "torch", "triton")

_common = None  # kernels._common once imported; False where Triton is not available


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


def interpreting() -> bool:
    """Whether the Triton kernels run in the interpreter (TRITON_INTERPRET=1 when they were imported)."""
    return _kernels() is not None and _kernels().INTERPRET


def check_backend(backend: str, what: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return backend


def triton_unavailable(device: torch.device, dtype: torch.dtype) -> tuple[type[Exception], str] | None:
    """Why the Triton kernels cannot run on tensors of ``device`` and ``dtype`` (exception type and
    message), or None if they can."""
    common = _kernels()
    if common is None:
        return RuntimeError, "backend='triton' but Triton is not available"
    if dtype not in common.KERNEL_DTYPES:
        return TypeError, f"backend='triton' takes float32, float16 or bfloat16, got {dtype}"
    if device.type != "cuda" and not common.INTERPRET:
        return ValueError, ("backend='triton' needs CUDA tensors (on CPU only with TRITON_INTERPRET=1, set "
                            "before triton is imported, for tests)")
    return None


def choose_backend(backend: str, device: torch.device, dtype: torch.dtype, what: str) -> str:
    """The backend that runs: ``"torch"`` or ``"triton"``. An explicit ``"triton"`` that cannot run on
    these tensors raises (``what`` names the op in the message); ``"auto"`` picks Triton on CUDA."""
    check_backend(backend, what)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_unavailable(device, dtype) is None else "torch"
    if backend == "triton":
        reason = triton_unavailable(device, dtype)
        if reason is not None:
            raise reason[0](f"{what}: {reason[1]}")
    return backend
