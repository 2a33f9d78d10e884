"""CPU kernels of the modulated deformable convolution (DCNv2, paper Eq. 6-8), compiled by numba, and their
``torch.library`` ops with autograd: the counterpart of ``kernels/deform_conv.py``, with the semantics of
``torchvision.ops.deform_conv2d`` and of the PyTorch path ``amsa.deform.deform_conv2d_torch``.

Sampling: tap k of offset group g at output position p samples the input at
``(ho*sh - ph + (k // kw)*dh + dy, wo*sw - pw + (k % kw)*dw + dx)``; a point with -1 <= h < H and
-1 <= w < W blends its four floor corners, corners outside the image counting zero; any other point
samples nothing. The input is read zero-padded by one pixel and channels-last ([H+2, W+2, C]), so every
corner of a sampled point is a valid address (the padding supplies the zeros, and on h = -1 exactly the
value is 0 while the offset gradient is the one-sided derivative into the image, torchvision's) and the
channels of a corner are contiguous (vectorised blends, no gathers).

Column tiles instead of the column tensor: the modulated samples of a tile of positions,
``col[p, gr, k, c]`` (weight group gr, tap k, channel c of the group), are written by a numba kernel and
multiplied with the weight by one ``torch.mm`` per weight group (BLAS, outside the parallel loop): memory
O(tile), not O(C * kh * kw * Ho * Wo). The backward forms the column gradient of a tile with ``torch.mm``
and scatters it: offset and mask gradients in parallel over positions (a reduction over channels, no
races), input gradients in parallel over channel blocks (each block owns its channels, so the scatter
needs no atomics and is deterministic for any thread count); grad_weight is ``torch.addmm`` of the
recomputed column tile.

Arithmetic in fp32 (fp64 for fp64 inputs); fp16/bf16 inputs sample in fp32, round the modulated columns
to their dtype and multiply in it, as the PyTorch path does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import prange

from kernels._cpu import helper, kernel, launch
from kernels._outputs import alloc

__all__ = ["cpu_deform_conv2d_bwd", "cpu_deform_conv2d_fwd"]

#: Elements of a column tile (8 MB in fp32): large enough for efficient GEMMs, small enough for the cache
#: hierarchy and a peak memory far below the column tensor.
TILE_ELEMENTS = 1 << 21


@helper
def _corners(xpad, offset, mask, has_mask, ch, l, ho, wo, ki, kj, conv):
    """Sample point of offset/mask channel ``ch`` (tap (ki, kj)) at flat output position l = (ho, wo).

    Returns (inside, a00, a01, a10, a11, ly, lx, m, at): whether it samples anything, the four bilinear
    weights (unmodulated), the fractional parts, the modulation m, and the element of its top-left corner
    in the flattened padded map xpad [H+2, W+2, C]."""
    sh, sw, ph, pw, dh, dw = conv
    H, W, C = xpad.shape[0] - 2, xpad.shape[1] - 2, xpad.shape[2]
    T = xpad.dtype.type
    h = T(ho * sh - ph + ki * dh) + offset[2 * ch, l]
    w = T(wo * sw - pw + kj * dw) + offset[2 * ch + 1, l]
    m = mask[ch, l] if has_mask else T(1)
    inside = h >= -1 and h < H and w >= -1 and w < W  # False for NaN points too
    if not inside:
        h, w = T(0), T(0)
    h0, w0 = np.floor(h), np.floor(w)
    ly, lx = h - h0, w - w0
    one = T(1)
    at = ((int(h0) + 1) * (W + 2) + int(w0) + 1) * C
    return inside, (one - ly) * (one - lx), (one - ly) * lx, ly * (one - lx), ly * lx, ly, lx, m, at


@helper
def _segment(lo, hi, gr, k, kk, c_per_g):
    """The channels of [lo, hi) in weight group gr: (first channel, count, their first column at tap k in
    the column layout [groups, kk, c_per_g])."""
    c_lo, c_hi = max(lo, gr * c_per_g), min(hi, (gr + 1) * c_per_g)
    return c_lo, c_hi - c_lo, (gr * kk + k) * c_per_g + c_lo - gr * c_per_g


@helper
def _runs(x, at, row_step, C, c, n):
    """The four corners' runs of n channels from channel c: the top-left corner at element ``at`` of a
    flattened padded map with C channels whose rows are ``row_step`` elements apart: (00, 01, 10, 11)."""
    a, b = at + c, at + row_step + c
    return x[a : a + n], x[a + C : a + C + n], x[b : b + n], x[b + C : b + C + n]


@kernel
def _sample_columns(xpad, offset, mask, has_mask, l0, n, col, Wo, kh, kw, c_per_g, conv):
    """col[p, (gr*kk + k)*c_per_g + c] = m * bilinear sample of channel gr*c_per_g + c at tap k, for the n
    positions l0 + p. xpad [H+2, W+2, C] one padded image; offset [2*G*kk, L], mask [G*kk, L]."""
    C = xpad.shape[2]
    kk = kh * kw
    c_og = C // (offset.shape[0] // (2 * kk))
    x, row_step = xpad.reshape(-1), xpad.shape[1] * C
    for p in prange(n):
        l = l0 + p
        for og in range(offset.shape[0] // (2 * kk)):
            for k in range(kk):
                inside, a00, a01, a10, a11, ly, lx, m, at = _corners(
                    xpad, offset, mask, has_mask, og * kk + k, l, l // Wo, l % Wo, k // kw, k % kw, conv)
                lo, hi = og * c_og, (og + 1) * c_og
                for gr in range(lo // c_per_g, (hi - 1) // c_per_g + 1):
                    c, cn, j = _segment(lo, hi, gr, k, kk, c_per_g)
                    dst = col[p, j : j + cn]
                    if not inside:
                        dst[:] = 0
                        continue
                    v00, v01, v10, v11 = _runs(x, at, row_step, C, c, cn)
                    for i in range(cn):
                        dst[i] = (a00 * v00[i] + a01 * v01[i] + a10 * v10[i] + a11 * v11[i]) * m


@kernel
def _offset_mask_grads(xpad, offset, mask, has_mask, gcol, l0, n, goff, gmask, Wo, kh, kw, c_per_g, conv):
    """grad_offset [2*G*kk, L] and grad_mask [G*kk, L] at the n positions l0 + p from the column gradient
    gcol [n, groups*kk*c_per_g] (layout of :func:`_sample_columns`), in parallel over positions:

        grad_mask[ch, l]       = sum_{c in og} gcol * v           (v: the unmodulated bilinear sample)
        grad_offset[2*ch, l]   = m * sum_{c in og} gcol * dv/dh   (2*ch + 1: dv/dw)
    """
    C = xpad.shape[2]
    kk = kh * kw
    c_og = C // (offset.shape[0] // (2 * kk))
    x, row_step = xpad.reshape(-1), xpad.shape[1] * C
    one = x.dtype.type(1)
    for p in prange(n):
        l = l0 + p
        for og in range(offset.shape[0] // (2 * kk)):
            for k in range(kk):
                ch = og * kk + k
                inside, a00, a01, a10, a11, ly, lx, m, at = _corners(
                    xpad, offset, mask, has_mask, ch, l, l // Wo, l % Wo, k // kw, k % kw, conv)
                g_v = g_h = g_w = x.dtype.type(0)
                lo, hi = og * c_og, (og + 1) * c_og
                for gr in range(lo // c_per_g, (hi - 1) // c_per_g + 1):
                    if not inside:
                        break
                    c, cn, j = _segment(lo, hi, gr, k, kk, c_per_g)
                    g = gcol[p, j : j + cn]
                    v00, v01, v10, v11 = _runs(x, at, row_step, C, c, cn)
                    for i in range(cn):
                        g_v += g[i] * (a00 * v00[i] + a01 * v01[i] + a10 * v10[i] + a11 * v11[i])
                        g_h += g[i] * ((one - lx) * (v10[i] - v00[i]) + lx * (v11[i] - v01[i]))
                        g_w += g[i] * ((one - ly) * (v01[i] - v00[i]) + ly * (v11[i] - v10[i]))
                goff[2 * ch, l] = m * g_h
                goff[2 * ch + 1, l] = m * g_w
                if has_mask:
                    gmask[ch, l] = g_v


@kernel
def _input_grad(gxpad, offset, mask, has_mask, gcol, l0, n, block, Wo, kh, kw, c_per_g, conv):
    """gxpad [H+2, W+2, C] += the column gradient of the n positions l0 + p scattered through the modulated
    bilinear weights, in parallel over blocks of ``block`` channels: each block owns its channels, so no
    two threads add to the same element, and every element is summed in position order (deterministic for
    any thread count)."""
    C = gxpad.shape[2]
    kk = kh * kw
    c_og = C // (offset.shape[0] // (2 * kk))
    gx, row_step = gxpad.reshape(-1), gxpad.shape[1] * C
    for blk in prange((C + block - 1) // block):
        b_lo, b_hi = blk * block, min(C, (blk + 1) * block)
        for p in range(n):
            l = l0 + p
            for og in range(b_lo // c_og, (b_hi - 1) // c_og + 1):
                lo, hi = max(b_lo, og * c_og), min(b_hi, (og + 1) * c_og)
                for k in range(kk):
                    inside, a00, a01, a10, a11, ly, lx, m, at = _corners(
                        gxpad, offset, mask, has_mask, og * kk + k, l, l // Wo, l % Wo, k // kw, k % kw, conv)
                    if not inside:
                        continue
                    for gr in range(lo // c_per_g, (hi - 1) // c_per_g + 1):
                        c, cn, j = _segment(lo, hi, gr, k, kk, c_per_g)
                        g = gcol[p, j : j + cn]
                        d00, d01, d10, d11 = _runs(gx, at, row_step, C, c, cn)
                        for i in range(cn):
                            gm = m * g[i]
                            d00[i] += a00 * gm
                            d01[i] += a01 * gm
                            d10[i] += a10 * gm
                            d11[i] += a11 * gm


class _Problem:
    """One call's geometry and its operands in the kernels' layouts: the padded channels-last input, the
    offsets and mask as [B, channels, Ho*Wo] in the sampling dtype, the column tile size."""

    def __init__(self, input, offset, mask, weight, conv):
        B, C, H, W = input.shape
        Cout, self.c_per_g, self.kh, self.kw = weight.shape
        self.groups, self.kk = C // self.c_per_g, self.kh * self.kw
        self.Ho, self.Wo = offset.shape[2], offset.shape[3]
        self.L, self.cout_per_g = self.Ho * self.Wo, Cout // self.groups
        self.conv = tuple(int(v) for v in conv)
        self.calc = torch.float64 if input.dtype == torch.float64 else torch.float32
        self.xpad = F.pad(input.to(self.calc), (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous()
        self.offset = offset.to(self.calc).reshape(B, -1, self.L).contiguous()
        self.has_mask = mask is not None
        self.mask = mask.to(self.calc).reshape(B, -1, self.L).contiguous() if self.has_mask else self.offset
        self.tile = max(1, min(self.L, TILE_ELEMENTS // (C * self.kk)))

    def tiles(self):
        """(batch element, first position, positions) of every column tile."""
        return ((b, l0, min(self.tile, self.L - l0)) for b in range(self.xpad.shape[0])
                for l0 in range(0, self.L, self.tile))

    def kernel_args(self, b):
        """The sampling arguments every kernel takes for batch element b (numpy views)."""
        return self.offset[b].numpy(), self.mask[b].numpy(), self.has_mask

    def geometry(self):
        return self.Wo, self.kh, self.kw, self.c_per_g, self.conv

    def columns(self, col, b, l0, n):
        """Fill col[:n] ([tile, groups, kk*c_per_g]) with the modulated samples of positions l0 .. l0 + n of
        batch element b."""
        with launch():
            _sample_columns(self.xpad[b].numpy(), *self.kernel_args(b), l0, n, col.view(col.shape[0], -1).numpy(),
                            *self.geometry())

    def weight_by_group(self, weight):
        """weight [Cout, c_per_g, kh, kw] -> [groups, Cout/groups, kk*c_per_g] in the column order (k, c)."""
        w = weight.reshape(self.groups, self.cout_per_g, self.c_per_g, self.kk).permute(0, 1, 3, 2)
        return w.reshape(self.groups, self.cout_per_g, self.kk * self.c_per_g)


@torch.library.custom_op("amsa::cpu_deform_conv2d_fwd", mutates_args=(), device_types="cpu")
def cpu_deform_conv2d_fwd(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
    bias: torch.Tensor | None, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int,
) -> torch.Tensor:
    """Forward of the modulated deformable convolution: out [B, Cout, Ho, Wo] (contiguous)."""
    pr = _Problem(input, offset, mask, weight, (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w))
    B, Cout, g_out = input.shape[0], weight.shape[0], pr.cout_per_g
    out = alloc((B, Cout, pr.L), input.dtype, input.device)
    wg = pr.weight_by_group(weight)
    col = alloc((pr.tile, pr.groups, pr.kk * pr.c_per_g), pr.calc, input.device)
    for b, l0, n in pr.tiles():
        pr.columns(col, b, l0, n)
        cols = col[:n].to(input.dtype)
        for gr in range(pr.groups):
            torch.mm(wg[gr], cols[:, gr].T, out=out[b, gr * g_out : (gr + 1) * g_out, l0 : l0 + n])
    if bias is not None:
        out += bias[:, None]
    return out.view(B, Cout, pr.Ho, pr.Wo)


@cpu_deform_conv2d_fwd.register_fake
def _(input, offset, mask, weight, bias, *conv):
    return input.new_empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


@torch.library.custom_op("amsa::cpu_deform_conv2d_bwd", mutates_args=(), device_types="cpu")
def cpu_deform_conv2d_bwd(
    grad_out: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None,
    weight: torch.Tensor, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int,
    need_input: bool, need_offset_mask: bool, need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (grad_input, grad_offset, grad_mask, grad_weight, grad_bias). Gradients that are not
    requested (``need_*`` False, or grad_mask without a mask) come back as empty tensors."""
    pr = _Problem(input, offset, mask, weight, (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w))
    B, C, H, W = input.shape
    g_out, width = pr.cout_per_g, pr.kk * pr.c_per_g
    dev = input.device
    go = grad_out.reshape(B, -1, pr.L)
    wg = pr.weight_by_group(weight)
    # Distinct empty tensors: outputs of a custom op must not alias each other.
    grad_input, grad_offset, grad_mask, grad_weight = (input.new_empty((0,)) for _ in range(4))
    gxpad = torch.zeros_like(pr.xpad) if need_input else None
    goff = alloc(tuple(pr.offset.shape), pr.calc, dev) if need_offset_mask else None
    gmask = alloc(tuple(pr.mask.shape), pr.calc, dev) if need_offset_mask and pr.has_mask else goff
    gw = torch.zeros(pr.groups, g_out, width, dtype=pr.calc, device=dev) if need_weight else None
    gcol = alloc((pr.tile, pr.groups, width), pr.calc, dev)
    col = alloc((pr.tile, pr.groups, width), pr.calc, dev) if need_weight else None
    block = max(8, -(-C // torch.get_num_threads()))  # channels per thread of the input-gradient scatter
    for b, l0, n in pr.tiles():
        if need_input or need_offset_mask:
            for gr in range(pr.groups):  # the column gradient of this tile: W^T grad_out
                gcol[:n, gr] = (go[b, gr * g_out : (gr + 1) * g_out, l0 : l0 + n].T @ wg[gr]).to(pr.calc)
            args = (gcol[:n].reshape(n, -1).numpy(), l0, n)
            with launch():
                if need_offset_mask:
                    _offset_mask_grads(pr.xpad[b].numpy(), *pr.kernel_args(b), *args, goff[b].numpy(),
                                       gmask[b].numpy(), *pr.geometry())
                if need_input:
                    _input_grad(gxpad[b].numpy(), *pr.kernel_args(b), *args, block, *pr.geometry())
        if need_weight:
            pr.columns(col, b, l0, n)
            cols = col[:n].to(input.dtype)
            for gr in range(pr.groups):
                gw[gr] += (go[b, gr * g_out : (gr + 1) * g_out, l0 : l0 + n] @ cols[:, gr]).to(pr.calc)
    if need_input:
        grad_input = gxpad[:, 1 : H + 1, 1 : W + 1].permute(0, 3, 1, 2).to(input.dtype).contiguous()
    if need_offset_mask:
        grad_offset = goff.view(offset.shape).to(offset.dtype)
        if pr.has_mask:
            grad_mask = gmask.view(mask.shape).to(mask.dtype)
    if need_weight:
        w = gw.view(pr.groups, g_out, pr.kk, pr.c_per_g).permute(0, 1, 3, 2)
        grad_weight = w.reshape(weight.shape).to(weight.dtype)
    grad_bias = grad_out.sum((0, 2, 3), dtype=pr.calc).to(grad_out.dtype)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


@cpu_deform_conv2d_bwd.register_fake
def _(grad_out, input, offset, mask, weight, *conv_and_needs):
    need_input, need_offset_mask, need_weight = conv_and_needs[-3:]
    empty = lambda: input.new_empty((0,))
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format) if need_input else empty(),
        offset.new_empty(offset.shape) if need_offset_mask else empty(),
        mask.new_empty(mask.shape) if need_offset_mask and mask is not None else empty(),
        weight.new_empty(weight.shape) if need_weight else empty(),
        grad_out.new_empty((weight.shape[0],)),
    )


def _setup_context(ctx, inputs, output) -> None:
    input, offset, mask, weight, bias, *conv = inputs
    ctx.save_for_backward(input, offset, mask, weight)
    ctx.conv, ctx.has_bias = conv, bias is not None


def _backward(ctx, grad_out: torch.Tensor):
    input, offset, mask, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    gi, go, gm, gw, gb = cpu_deform_conv2d_bwd(grad_out, input, offset, mask, weight, *ctx.conv,
                                               need[0], need[1] or need[2], need[3])
    return (gi if need[0] else None, go if need[1] else None, gm if need[2] and mask is not None else None,
            gw if need[3] else None, gb if need[4] and ctx.has_bias else None, *([None] * len(ctx.conv)))


cpu_deform_conv2d_fwd.register_autograd(_backward, setup_context=_setup_context)
