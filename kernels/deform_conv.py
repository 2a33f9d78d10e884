"""Modulated deformable convolution (DCNv2, paper Eq. 6-8): launchers, ``torch.library`` ops and autograd.

Semantics are exactly those of ``torchvision.ops.deform_conv2d`` (written out in
``kernels/deform_conv_fwd.py``). Three kernels, none of which materialises the column tensor ``col``
(C * kh * kw * Ho * Wo): the forward implicit GEMM (``kernels/deform_conv_fwd.py``), and the data and
weight gradients (``kernels/deform_conv_bwd.py``); grad_bias, a plain reduction of grad_out, is taken by
the autograd glue (``kernels/_deform_autograd.py``).

The kernels read the input channels-last (a copy unless it already is), so that the corners of a block of
channels are 16-byte vectors; offsets, mask, bias and grad_out contiguous (copies where they are not, e.g. an
expanded grad_out). Outputs are allocated contiguous inside the ops; grad_input is accumulated in fp32
channels-last and converted once. Addresses are int64 from the per-sample bases on, so tensors beyond
2**31 elements are safe.
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op, wrap_triton

from kernels._common import INTERPRET, alloc
from kernels._deform_autograd import backward_fake, not_requested, register_autograd
from kernels.deform_conv_bwd import _deform_conv_bwd_data_kernel, _deform_conv_bwd_weight_kernel
from kernels.deform_conv_fwd import _deform_conv_fwd_kernel


def _geometry(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor) -> tuple:
    """(B, C, H, W, HO, WO, Cout, C_PER_G, COUT_PER_G, groups, G, KH, KW) from shapes (validated upstream)."""
    B, C, H, W = input.shape
    Cout, c_per_g, KH, KW = weight.shape
    groups = C // c_per_g
    G = offset.shape[1] // (2 * KH * KW)
    return B, C, H, W, offset.shape[2], offset.shape[3], Cout, c_per_g, Cout // groups, groups, G, KH, KW


def _permuted_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """weight [Cout, C_PER_G, KH, KW] -> [groups, KH*KW, C_PER_G, COUT_PER_G] contiguous, so that kernels
    read weight tiles with unit stride along output channels."""
    Cout, c_per_g, KH, KW = weight.shape
    return weight.reshape(groups, Cout // groups, c_per_g, KH * KW).permute(0, 3, 2, 1).contiguous()


def _mask_args(mask: torch.Tensor | None, offset: torch.Tensor) -> tuple:
    """(mask pointer, HAS_MASK): without a mask the offset stands in for the pointer (never read)."""
    return (offset, 0) if mask is None else (mask.contiguous(), 1)


def _n_block(n: int) -> int:
    """Output channels of a program: all of a group's, as a power of two in [16, 256] (plain comparisons:
    also fine for SymInts). The interpreter uses 16, so that small test shapes span several blocks."""
    if INTERPRET:
        return 16
    block = 16
    while block < n and block < 256:
        block *= 2
    return block


def _p_block(block_c: int, elem: int) -> int:
    """Positions per program of the backward kernels (8 warps): enough that each thread's share of a
    [BLOCK_P, BLOCK_C] corner tile is a whole 16-byte vector."""
    return max(64, 256 * 16 // (block_c * elem))


def _segments(C: int, G: int, c_per_g: int) -> int:
    """Most weight groups that one offset group's channels meet (1 unless groups and offset groups
    interleave)."""
    cpo = C // G
    return max((og * cpo + cpo - 1) // c_per_g - og * cpo // c_per_g + 1 for og in range(G))


def _programs_wanted(dev: torch.device) -> int:
    """Programs that fill the GPU: four per multiprocessor (two in the interpreter, to test splitting)."""
    return 2 if INTERPRET else 4 * torch.cuda.get_device_properties(dev).multi_processor_count


@triton_op("amsa::deform_conv2d_fwd", mutates_args=())
def deform_conv2d_fwd(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dil_h: int,
    dil_w: int,
) -> torch.Tensor:
    """Forward of the modulated deformable convolution; returns out [B, Cout, Ho, Wo] (contiguous)."""
    B, C, H, W, HO, WO, Cout, c_per_g, cout_per_g, groups, G, KH, KW = _geometry(input, offset, weight)
    x = input.contiguous(memory_format=torch.channels_last)
    wt = _permuted_weight(weight, groups)
    out = alloc((B, Cout, HO, WO), input.dtype, input.device)
    msk, has_mask = _mask_args(mask, offset)
    block_n = _n_block(cout_per_g)

    def grid(meta):
        return (triton.cdiv(HO * WO, meta["BLOCK_P"]), B * groups * triton.cdiv(cout_per_g, block_n))

    wrap_triton(_deform_conv_fwd_kernel)[grid](
        x, offset.contiguous(), msk, wt, wt if bias is None else bias.contiguous(), out,
        H, W, HO, WO, c_per_g, cout_per_g, groups, G, *x.stride(),
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        C_PER_OG=C // G, KH=KH, KW=KW, HAS_MASK=has_mask, HAS_BIAS=int(bias is not None), BLOCK_N=block_n,
    )
    return out


@triton_op("amsa::deform_conv2d_bwd", mutates_args=())
def deform_conv2d_bwd(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dil_h: int,
    dil_w: int,
    need_input: bool,
    need_offset_mask: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (grad_input, grad_offset, grad_mask, grad_weight). Gradients that are not requested
    (``need_*`` False, or grad_mask without a mask) come back as empty tensors."""
    B, C, H, W, HO, WO, Cout, c_per_g, cout_per_g, groups, G, KH, KW = _geometry(input, offset, weight)
    KK = KH * KW
    dev = input.device
    x = input.contiguous(memory_format=torch.channels_last)
    gout = grad_out.contiguous()
    off = offset.contiguous()
    msk, has_mask = _mask_args(mask, off)
    convs = (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
    block_n = _n_block(cout_per_g)
    p_tiles_of = lambda block_p: triton.cdiv(HO * WO, block_p)
    grad_input, grad_offset, grad_mask, grad_weight = (not_requested(input) for _ in range(4))

    if need_input or need_offset_mask:
        wt = _permuted_weight(weight, groups)
        gx = torch.zeros_like(x, dtype=torch.float32)  # channels-last, like x
        block_c = 16 if INTERPRET or C // G <= 16 else 32
        block_p = 16 if INTERPRET else _p_block(block_c, x.element_size())
        nseg = _segments(C, G, c_per_g)
        base = B * G * nseg * p_tiles_of(block_p)
        csplit = max(1, min(triton.cdiv(C // G, block_c), triton.cdiv(_programs_wanted(dev), base)))
        slots = csplit * nseg
        # One slot: final gradients written directly; several: fp32 partials summed below.
        part_dtype = (lambda t: t.dtype) if slots == 1 else (lambda t: torch.float32)
        goff = alloc((slots * B, 2 * G * KK, HO, WO), part_dtype(offset), dev)
        gmsk = alloc((slots * B, G * KK, HO, WO), part_dtype(mask), dev) if mask is not None else goff
        wrap_triton(_deform_conv_bwd_data_kernel)[(p_tiles_of(block_p), B * G * nseg * csplit)](
            gout, x, off, msk, wt, gx, goff, gmsk,
            B, H, W, HO, WO, c_per_g, cout_per_g, groups, G, csplit, nseg, *x.stride(), *convs,
            C_PER_OG=C // G, KH=KH, KW=KW, HAS_MASK=has_mask, NEED_GRAD_INPUT=int(need_input),
            BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_C=block_c, ONE_N=int(cout_per_g <= block_n),
        )
        if need_input:
            grad_input = gx.to(dtype=input.dtype, memory_format=torch.contiguous_format)
        if need_offset_mask:
            grad_offset = goff if slots == 1 else goff.view(slots, *offset.shape).sum(0).to(offset.dtype)
            if mask is not None:
                grad_mask = gmsk if slots == 1 else gmsk.view(slots, *mask.shape).sum(0).to(mask.dtype)

    if need_weight:
        block_c = 16 if INTERPRET or min(c_per_g, C // G) <= 16 else 32
        block_p = 16 if INTERPRET else _p_block(block_c, x.element_size())
        base = groups * triton.cdiv(cout_per_g, block_n) * KK * triton.cdiv(c_per_g, block_c)
        tiles = B * p_tiles_of(block_p)
        split = max(1, min(tiles, triton.cdiv(_programs_wanted(dev), base)))
        gw = alloc((split, Cout, c_per_g, KK), torch.float32, dev)
        wrap_triton(_deform_conv_bwd_weight_kernel)[(split, base)](
            gout, x, off, msk, gw,
            B, H, W, HO, WO, c_per_g, cout_per_g, groups, G, split, *x.stride(), *convs,
            C_PER_OG=C // G, KH=KH, KW=KW, HAS_MASK=has_mask, BLOCK_P=block_p, BLOCK_N=block_n,
            BLOCK_C=block_c,
        )
        grad_weight = gw.sum(0).reshape(Cout, c_per_g, KH, KW).to(weight.dtype)

    return grad_input, grad_offset, grad_mask, grad_weight


register_autograd(deform_conv2d_fwd, deform_conv2d_bwd)


def _fwd_fake(input, offset, mask, weight, bias, *conv) -> torch.Tensor:
    B, _, _, _, HO, WO, Cout, *_ = _geometry(input, offset, weight)
    return input.new_empty((B, Cout, HO, WO))


if INTERPRET:
    # Under TRITON_INTERPRET=1, wrap_triton hands back the interpreted kernel unwrapped, so the ops' bodies
    # cannot be traced with fake tensors. There the ops stay opaque to tracing (explicit fake kernels, no
    # decomposition under functionalization) and run eagerly; on GPU, triton_op's tracing is used.
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def _keep_opaque(mode, op, types, args, kwargs):
        return mode.__torch_dispatch__(op, types, args, kwargs)

    for _op, _fake in ((deform_conv2d_fwd, _fwd_fake), (deform_conv2d_bwd, backward_fake)):
        _op.register_fake(_fake)
        _op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
