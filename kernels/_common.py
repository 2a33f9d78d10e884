"""Plumbing every Triton kernel file shares: the interpreter flag, output allocation (poisoned under test,
``kernels/_outputs.py``, re-exported here) and the jit helpers that more than one kernel calls. Triton
kernel files import only this module and triton."""

from __future__ import annotations

import os

import triton
import triton.language as tl

from kernels._outputs import alloc, alloc_like

__all__ = ["INTERPRET", "alloc", "alloc_like", "dot"]

#: Kernels run in the Triton interpreter (CPU, tests). Triton reads TRITON_INTERPRET when a kernel is
#: decorated, i.e. when the kernel files are imported, so this is read once, at the same time.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The interpreter (triton 3.6) multiplies the raw uint16 storage of bf16 operands in tl.dot; there the
# operands are widened to fp32 first, which gives the same exact products and fp32 accumulation.
_BF16_DOT_AS_FP32 = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b with fp32 accumulation; IEEE: fp32 operands use exact products, not TF32, as PyTorch's
    default matmul does."""
    if _BF16_DOT_AS_FP32 and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)
