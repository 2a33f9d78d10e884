"""Plumbing every kernel file shares: the interpreter flag, output allocation (poisoned under test) and
the jit helpers that more than one kernel calls. Kernel files import only this module and triton."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: Kernels run in the Triton interpreter (CPU, tests). Triton reads TRITON_INTERPRET when a kernel is
#: decorated, i.e. when the kernel files are imported, so this is read once, at the same time.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: Tests set this to fill every kernel-written output with garbage (NaN, or -7 for integers) before the
#: launch, proving that every element is written. Off in normal use (outputs come from ``torch.empty``).
POISON_OUTPUTS = False

#: Floating-point dtypes the kernels take.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The interpreter (triton 3.6) multiplies the raw uint16 storage of bf16 operands in tl.dot; there the
# operands are widened to fp32 first, which gives the same exact products and fp32 accumulation.
_BF16_DOT_AS_FP32 = tl.constexpr(INTERPRET)


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output tensor for a kernel to fill: ``torch.empty``, or poisoned under :data:`POISON_OUTPUTS`."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    poison = float("nan") if dtype.is_floating_point else -7
    return torch.full(shape, poison, dtype=dtype, device=device)


def alloc_like(t: torch.Tensor) -> torch.Tensor:
    """:func:`alloc` with the shape, dtype and device of ``t`` (contiguous)."""
    return alloc(tuple(t.shape), t.dtype, t.device)


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b with fp32 accumulation; IEEE: fp32 operands use exact products, not TF32, as PyTorch's
    default matmul does."""
    if _BF16_DOT_AS_FP32 and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)
