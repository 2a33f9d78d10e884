"""Output allocation for every kernel, Triton and CPU alike: ``torch.empty``, or poisoned under test. No
triton import here, so the CPU kernels (``kernels/cpu_*.py``) run where Triton is not installed."""

from __future__ import annotations

import torch

#: Tests set this to fill every kernel-written output with garbage (NaN, or -7 for integers) before the
#: launch, proving that every element is written. Off in normal use (outputs come from ``torch.empty``).
POISON_OUTPUTS = False


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output tensor for a kernel to fill: ``torch.empty``, or poisoned under :data:`POISON_OUTPUTS`."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    poison = float("nan") if dtype.is_floating_point else -7
    return torch.full(shape, poison, dtype=dtype, device=device)


def alloc_like(t: torch.Tensor) -> torch.Tensor:
    """:func:`alloc` with the shape, dtype and device of ``t`` (contiguous)."""
    return alloc(tuple(t.shape), t.dtype, t.device)
