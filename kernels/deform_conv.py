"""Modulated deformable convolution (DCNv2, paper Eq. 6-8): launchers, ``torch.library`` ops and autograd.

Semantics are exactly those of ``torchvision.ops.deform_conv2d`` (written out in
``kernels/deform_conv_fwd.py``). Three kernels, none of which materialises the column tensor ``col``
(C * kh * kw * Ho * Wo): the forward implicit GEMM (``kernels/deform_conv_fwd.py``), and the data and
weight gradients (``kernels/deform_conv_bwd.py``); grad_bias is a plain reduction of grad_out.

Input tensors are read through explicit strides (any layout, including channels-last and expanded
grad_out); outputs are allocated contiguous inside the ops. Address arithmetic is done in int64 so tensors
beyond 2**31 elements are safe.
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op, wrap_triton

from kernels._common import INTERPRET, alloc
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
    if mask is None:
        return offset, 0, 0, 0, 0, 0
    return (mask, *mask.stride(), 1)


def _c_block(c: int, dtype: torch.dtype) -> int:
    """Channel block: 16 when a segment is that short (less masked work); fp32 (IEEE dot, more
    registers) always uses 16 in the data-gradient kernel to avoid spills."""
    return 16 if c <= 16 or dtype == torch.float32 else 32


def _n_block(n: int) -> int:
    """Smallest power of two >= n within [16, 64] (plain comparisons: also fine for SymInts)."""
    block = 16
    while block < n and block < 64:
        block *= 2
    return block


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
    wt = _permuted_weight(weight, groups)
    out = alloc((B, Cout, HO, WO), input.dtype, input.device)
    msk, smb, smc, smh, smw, has_mask = _mask_args(mask, offset)

    def grid(meta):
        tiles = triton.cdiv(HO * WO, meta["BLOCK_P"]) * triton.cdiv(cout_per_g, meta["BLOCK_N"])
        return (B * groups * tiles,)

    wrap_triton(_deform_conv_fwd_kernel)[grid](
        input, offset, msk, wt, bias if bias is not None else wt, out,
        H, W, HO, WO, c_per_g, cout_per_g, C // G, groups,
        *input.stride(), *offset.stride(), smb, smc, smh, smw,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH=KH, KW=KW, HAS_MASK=has_mask, HAS_BIAS=int(bias is not None),
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
    need_input: int,
    need_offset_mask: int,
    need_weight: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (grad_input, grad_offset, grad_mask, grad_weight, grad_bias). Gradients that are not
    requested (``need_*`` = 0, or grad_mask without a mask) come back as empty tensors."""
    B, C, H, W, HO, WO, Cout, c_per_g, cout_per_g, groups, G, KH, KW = _geometry(input, offset, weight)
    KK = KH * KW
    dev = input.device
    msk, smb, smc, smh, smw, has_mask = _mask_args(mask, offset)
    convs = (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
    # Distinct empty tensors: outputs of a custom op must not alias each other.
    grad_input, grad_offset, grad_mask, grad_weight = (input.new_empty((0,)) for _ in range(4))

    if need_input or need_offset_mask:
        wt = _permuted_weight(weight, groups)
        gx = torch.zeros((B, C, H, W), dtype=torch.float32, device=dev)
        block_p = 16 if INTERPRET else 64
        block_c = 16 if INTERPRET else _c_block(C // G, input.dtype)
        base = B * G * triton.cdiv(HO * WO, block_p)
        c_blocks = triton.cdiv(C // G, block_c)
        if INTERPRET:
            csplit = min(2, c_blocks)
        else:
            target = 4 * torch.cuda.get_device_properties(dev).multi_processor_count
            csplit = max(1, min(c_blocks, triton.cdiv(target, base)))
        # One split: final gradients written directly; several: fp32 partials summed below.
        part_dtype = (lambda t: t.dtype) if csplit == 1 else (lambda t: torch.float32)
        goff = alloc((csplit * B, 2 * G * KK, HO, WO), part_dtype(offset), dev)
        gmsk = alloc((csplit * B, G * KK, HO, WO), part_dtype(mask), dev) if mask is not None else goff
        wrap_triton(_deform_conv_bwd_data_kernel)[(base * csplit,)](
            grad_out, input, offset, msk, wt, gx, goff, gmsk,
            B, H, W, HO, WO, c_per_g, cout_per_g, C // G, G, csplit,
            *grad_out.stride(), *input.stride(), *offset.stride(), smb, smc, smh, smw, *convs,
            KH=KH, KW=KW, HAS_MASK=has_mask, NEED_GRAD_INPUT=int(bool(need_input)),
            BLOCK_P=block_p, BLOCK_N=16 if INTERPRET else _n_block(cout_per_g), BLOCK_C=block_c,
            num_warps=8,
        )
        if need_input:
            grad_input = gx.to(input.dtype)
        if need_offset_mask:
            grad_offset = goff if csplit == 1 else goff.view(csplit, *offset.shape).sum(0).to(offset.dtype)
            if mask is not None:
                grad_mask = gmsk if csplit == 1 else gmsk.view(csplit, *mask.shape).sum(0).to(mask.dtype)

    if need_weight:
        block_p, block_n = (16, 16) if INTERPRET else (64, _n_block(cout_per_g))
        block_c = 16 if INTERPRET or min(c_per_g, C // G) <= 16 else 32
        base = groups * triton.cdiv(cout_per_g, block_n) * KK * triton.cdiv(c_per_g, block_c)
        tiles = B * triton.cdiv(HO * WO, block_p)
        if INTERPRET:
            split = min(2, tiles)
        else:
            target = 4 * torch.cuda.get_device_properties(dev).multi_processor_count
            split = max(1, min(tiles, triton.cdiv(target, base)))
        gw = alloc((split, Cout, c_per_g, KK), torch.float32, dev)
        wrap_triton(_deform_conv_bwd_weight_kernel)[(base * split,)](
            grad_out, input, offset, msk, gw,
            B, H, W, HO, WO, c_per_g, cout_per_g, C // G, groups, split,
            *grad_out.stride(), *input.stride(), *offset.stride(), smb, smc, smh, smw, *convs,
            KH=KH, KW=KW, HAS_MASK=has_mask, BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_C=block_c,
            num_warps=8,
        )
        grad_weight = gw.sum(0).reshape(Cout, c_per_g, KH, KW).to(weight.dtype)

    grad_bias = grad_out.sum((0, 2, 3), dtype=torch.float32).to(grad_out.dtype)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


def _setup_context(ctx, inputs, output) -> None:
    input, offset, mask, weight, bias, *conv = inputs
    ctx.save_for_backward(input, offset, mask, weight)
    ctx.conv = conv
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out: torch.Tensor):
    input, offset, mask, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    gi, go, gm, gw, gb = deform_conv2d_bwd(
        grad_out, input, offset, mask, weight, *ctx.conv,
        int(need[0]), int(need[1] or need[2]), int(need[3]),
    )
    return (
        gi if need[0] else None,
        go if need[1] else None,
        gm if need[2] and mask is not None else None,
        gw if need[3] else None,
        gb if need[4] and ctx.has_bias else None,
        *([None] * len(ctx.conv)),
    )


deform_conv2d_fwd.register_autograd(_backward, setup_context=_setup_context)


def _fwd_fake(input, offset, mask, weight, bias, *conv) -> torch.Tensor:
    B, _, _, _, HO, WO, Cout, *_ = _geometry(input, offset, weight)
    return input.new_empty((B, Cout, HO, WO))


def _bwd_fake(grad_out, input, offset, mask, weight, *conv_and_needs) -> tuple:
    need_input, need_offset_mask, need_weight = conv_and_needs[-3:]
    empty = lambda: input.new_empty((0,))
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if need_input else empty(),
        offset.new_empty(offset.shape) if need_offset_mask else empty(),
        mask.new_empty(mask.shape) if need_offset_mask and mask is not None else empty(),
        weight.new_empty(weight.shape) if need_weight else empty(),
        grad_out.new_empty((weight.shape[0],)),
    )


if INTERPRET:
    # Under TRITON_INTERPRET=1, wrap_triton hands back the interpreted kernel unwrapped, so the ops' bodies
    # cannot be traced with fake tensors. There the ops stay opaque to tracing (explicit fake kernels, no
    # decomposition under functionalization) and run eagerly; on GPU, triton_op's tracing is used.
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def _keep_opaque(mode, op, types, args, kwargs):
        return mode.__torch_dispatch__(op, types, args, kwargs)

    for _op, _fake in ((deform_conv2d_fwd, _fwd_fake), (deform_conv2d_bwd, _bwd_fake)):
        _op.register_fake(_fake)
        _op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
