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
from numba import prange

from kernels._cpu import helper, kernel, launch
from kernels._deform_autograd import backward_fake, not_requested, register_autograd
from kernels._outputs import alloc

__all__ = ["cpu_deform_conv2d_bwd", "cpu_deform_conv2d_fwd"]

#: Elements of a column tile (4 MB in fp32): large enough for efficient GEMMs, small enough for the cache
#: hierarchy and a peak memory far below the column tensor.
TILE_ELEMENTS = 1 << 20


@helper
def _corners(xpad, offset, mask, has_mask, ch, q, ho, wo, ki, kj, conv):
    """Sample point of offset/mask channel ``ch`` (tap (ki, kj)) at flat output position q = (ho, wo).

    Returns (inside, a00, a01, a10, a11, ly, lx, m, at): whether it samples anything, the four bilinear
    weights (unmodulated), the fractional parts, the modulation m, and the element of its top-left corner
    in the flattened padded map xpad [H+2, W+2, C]."""
    sh, sw, ph, pw, dh, dw = conv
    H, W, C = xpad.shape[0] - 2, xpad.shape[1] - 2, xpad.shape[2]
    T = xpad.dtype.type
    h = T(ho * sh - ph + ki * dh) + offset[q, 2 * ch]
    w = T(wo * sw - pw + kj * dw) + offset[q, 2 * ch + 1]
    m = mask[q, ch] if has_mask else T(1)
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
    positions l0 + p. xpad [H+2, W+2, C] one padded image; offset [L, 2*G*kk], mask [L, G*kk] (position-
    major: the taps of a position are contiguous)."""
    C = xpad.shape[2]
    kk = kh * kw
    G = offset.shape[1] // (2 * kk)
    c_og = C // G
    x, row_step = xpad.reshape(-1), xpad.shape[1] * C
    for p in prange(n):
        q = l0 + p
        for og in range(G):
            lo, hi = og * c_og, (og + 1) * c_og
            for ki in range(kh):
                for kj in range(kw):
                    k = ki * kw + kj
                    inside, a00, a01, a10, a11, ly, lx, m, at = _corners(
                        xpad, offset, mask, has_mask, og * kk + k, q, q // Wo, q % Wo, ki, kj, conv)
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
    """grad_offset [L, 2*G*kk] and grad_mask [L, G*kk] at the n positions l0 + p from the column gradient
    gcol [n, groups*kk*c_per_g] (layout of :func:`_sample_columns`), in parallel over positions:

        grad_mask[q, ch]       = sum_{c in og} gcol * v           (v: the unmodulated bilinear sample)
        grad_offset[q, 2*ch]   = m * sum_{c in og} gcol * dv/dh   (2*ch + 1: dv/dw)
    """
    C = xpad.shape[2]
    kk = kh * kw
    G = offset.shape[1] // (2 * kk)
    c_og = C // G
    x, row_step = xpad.reshape(-1), xpad.shape[1] * C
    one = x.dtype.type(1)
    for p in prange(n):
        q = l0 + p
        for og in range(G):
            lo, hi = og * c_og, (og + 1) * c_og
            for ki in range(kh):
                for kj in range(kw):
                    k = ki * kw + kj
                    ch = og * kk + k
                    inside, a00, a01, a10, a11, ly, lx, m, at = _corners(
                        xpad, offset, mask, has_mask, ch, q, q // Wo, q % Wo, ki, kj, conv)
                    g_v = g_h = g_w = x.dtype.type(0)
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
                    goff[q, 2 * ch] = m * g_h
                    goff[q, 2 * ch + 1] = m * g_w
                    if has_mask:
                        gmask[q, ch] = g_v


@kernel
def _input_grad(gxpad, offset, mask, has_mask, gcol, l0, n, block, Wo, kh, kw, c_per_g, conv):
    """gxpad [H+2, W+2, C] += the column gradient of the n positions l0 + p scattered through the modulated
    bilinear weights, in parallel over blocks of ``block`` channels: each block owns its channels, so no
    two threads add to the same element, and every element is summed in position order (deterministic for
    any thread count)."""
    C = gxpad.shape[2]
    kk = kh * kw
    c_og = C // (offset.shape[1] // (2 * kk))
    gx, row_step = gxpad.reshape(-1), gxpad.shape[1] * C
    for blk in prange((C + block - 1) // block):
        b_lo, b_hi = blk * block, min(C, (blk + 1) * block)
        for p in range(n):
            q = l0 + p
            for og in range(b_lo // c_og, (b_hi - 1) // c_og + 1):
                lo, hi = max(b_lo, og * c_og), min(b_hi, (og + 1) * c_og)
                for ki in range(kh):
                    for kj in range(kw):
                        k = ki * kw + kj
                        inside, a00, a01, a10, a11, ly, lx, m, at = _corners(
                            gxpad, offset, mask, has_mask, og * kk + k, q, q // Wo, q % Wo, ki, kj, conv)
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
    """One call's geometry, and each image's operands in the kernels' layouts (:meth:`image`)."""

    def __init__(self, input, offset, mask, weight, conv):
        self.input, self.offset, self.mask = input, offset, mask
        C = input.shape[1]
        Cout, self.c_per_g, self.kh, self.kw = weight.shape
        self.groups, self.kk = C // self.c_per_g, self.kh * self.kw
        self.cout_per_g, self.width = Cout // self.groups, self.kk * self.c_per_g
        self.Ho, self.Wo = offset.shape[2], offset.shape[3]
        self.L = self.Ho * self.Wo
        self.conv = tuple(int(v) for v in conv)
        self.calc = torch.float64 if input.dtype == torch.float64 else torch.float32
        self.tile = max(1, min(self.L, TILE_ELEMENTS // (C * self.kk)))  # positions per column tile

    def image(self, b: int) -> tuple:
        """Batch element b in the sampling dtype: the padded channels-last input [H+2, W+2, C], and the
        offsets [L, 2*G*kk] and mask [L, G*kk] position-major (a position's taps contiguous; the mask is
        the offsets when there is none). One image at a time keeps the copies small."""
        position_major = lambda t: t[b].to(self.calc).flatten(1).T.contiguous()  # no copy if channels-last
        H, W = self.input.shape[2:]
        xpad = torch.zeros((H + 2, W + 2, self.input.shape[1]), dtype=self.calc, device=self.input.device)
        xpad[1 : H + 1, 1 : W + 1] = self.input[b].permute(1, 2, 0)  # a plain copy if channels-last
        off = position_major(self.offset)
        return xpad, off, off if self.mask is None else position_major(self.mask)

    def tiles(self):
        """(first position, positions) of every column tile of an image."""
        return ((l0, min(self.tile, self.L - l0)) for l0 in range(0, self.L, self.tile))

    def sampling(self, image) -> tuple:
        """The arguments every kernel takes after its first: offsets, mask and their geometry."""
        _, off, msk = image
        return off.numpy(), msk.numpy(), self.mask is not None

    def geometry(self) -> tuple:
        return self.Wo, self.kh, self.kw, self.c_per_g, self.conv

    def columns(self, image, col, l0: int, n: int) -> torch.Tensor:
        """col[:n] ([tile, groups, kk*c_per_g]) filled with the modulated samples of positions l0 .. l0+n,
        in the input's dtype."""
        with launch():
            _sample_columns(image[0].numpy(), *self.sampling(image), l0, n,
                            col.view(col.shape[0], -1).numpy(), *self.geometry())
        return col[:n].to(self.input.dtype)

    def weight_by_group(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [Cout, c_per_g, kh, kw] -> [groups, Cout/groups, kk*c_per_g] in the column order (k, c)."""
        w = weight.reshape(self.groups, self.cout_per_g, self.c_per_g, self.kk).permute(0, 1, 3, 2)
        return w.reshape(self.groups, self.cout_per_g, self.width)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> None:
    """out = a @ b (accumulate: out += a @ b) in place, without a temporary where the dtypes agree (fp16/bf16
    products are widened into fp32 buffers)."""
    if out.dtype != a.dtype:
        out.add_(a @ b) if accumulate else out.copy_(a @ b)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


@torch.library.custom_op("amsa::cpu_deform_conv2d_fwd", mutates_args=(), device_types="cpu")
def cpu_deform_conv2d_fwd(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
    bias: torch.Tensor | None, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int,
) -> torch.Tensor:
    """Forward of the modulated deformable convolution: out [B, Cout, Ho, Wo], channels-last when the input
    is (:func:`_channels_last`), else contiguous."""
    pr = _Problem(input, offset, mask, weight, (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w))
    B, Cout, g_out = input.shape[0], weight.shape[0], pr.cout_per_g
    last = _channels_last(input)
    # Channels-last: out[b, p, :] = cols[p] W^T, rows written where they belong (no transposing copy).
    out = alloc((B, pr.L, Cout) if last else (B, Cout, pr.L), input.dtype, input.device)
    wg = pr.weight_by_group(weight)
    col = alloc((pr.tile, pr.groups, pr.width), pr.calc, input.device)
    for b in range(B):
        image = pr.image(b)
        for l0, n in pr.tiles():
            cols = pr.columns(image, col, l0, n)
            for gr in range(pr.groups):
                rows = slice(gr * g_out, (gr + 1) * g_out)
                if last:
                    _mm_into(out[b, l0 : l0 + n, rows], cols[:, gr], wg[gr].T)
                else:
                    _mm_into(out[b, rows, l0 : l0 + n], wg[gr], cols[:, gr].T)
    if bias is not None:
        out += bias if last else bias[:, None]
    if last:
        return out.view(B, pr.Ho, pr.Wo, Cout).permute(0, 3, 1, 2)
    return out.view(B, Cout, pr.Ho, pr.Wo)


def _channels_last(input: torch.Tensor) -> bool:
    """Whether the output is channels-last: the input is, and is not also contiguous (C = 1 or H = W = 1)."""
    return input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()


@cpu_deform_conv2d_fwd.register_fake
def _(input, offset, mask, weight, bias, *conv):
    fmt = torch.channels_last if _channels_last(input) else torch.contiguous_format
    return torch.empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]),
                       dtype=input.dtype, device=input.device, memory_format=fmt)


@torch.library.custom_op("amsa::cpu_deform_conv2d_bwd", mutates_args=(), device_types="cpu")
def cpu_deform_conv2d_bwd(
    grad_out: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None,
    weight: torch.Tensor, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dil_h: int, dil_w: int,
    need_input: bool, need_offset_mask: bool, need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (grad_input, grad_offset, grad_mask, grad_weight). Gradients that are not requested
    (``need_*`` False, or grad_mask without a mask) come back as empty tensors."""
    pr = _Problem(input, offset, mask, weight, (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w))
    B, C, H, W = input.shape
    g_out, dev, calc = pr.cout_per_g, input.device, pr.calc
    need_mask = need_offset_mask and mask is not None
    go = grad_out.reshape(B, -1, pr.L)
    wg = pr.weight_by_group(weight)
    grad_input = alloc(tuple(input.shape), input.dtype, dev) if need_input else not_requested(input)
    grad_offset = alloc(tuple(offset.shape), offset.dtype, dev) if need_offset_mask else not_requested(input)
    grad_mask = alloc(tuple(mask.shape), mask.dtype, dev) if need_mask else not_requested(input)
    gw = torch.zeros(pr.groups, g_out, pr.width, dtype=calc, device=dev) if need_weight else None
    gcol = alloc((pr.tile, pr.groups, pr.width), calc, dev)
    col = alloc((pr.tile, pr.groups, pr.width), calc, dev) if need_weight else None
    block = max(8, -(-C // torch.get_num_threads()))  # channels per thread of the input-gradient scatter
    for b in range(B):
        image = pr.image(b)
        gxpad = torch.zeros_like(image[0]) if need_input else None
        goff = alloc((pr.L, offset.shape[1]), calc, dev) if need_offset_mask else None
        gmsk = alloc((pr.L, mask.shape[1]), calc, dev) if need_mask else goff
        for l0, n in pr.tiles():
            g_b = go[b, :, l0 : l0 + n]
            if need_input or need_offset_mask:
                for gr in range(pr.groups):  # the column gradient of this tile: W^T grad_out
                    _mm_into(gcol[:n, gr], g_b[gr * g_out : (gr + 1) * g_out].T, wg[gr])
                args = (*pr.sampling(image), gcol[:n].view(n, -1).numpy(), l0, n)
                with launch():
                    if need_offset_mask:
                        _offset_mask_grads(image[0].numpy(), *args, goff.numpy(), gmsk.numpy(),
                                           *pr.geometry())
                    if need_input:
                        _input_grad(gxpad.numpy(), *args, block, *pr.geometry())
            if need_weight:
                cols = pr.columns(image, col, l0, n)
                for gr in range(pr.groups):
                    _mm_into(gw[gr], g_b[gr * g_out : (gr + 1) * g_out], cols[:, gr], accumulate=True)
        if need_input:
            grad_input[b] = gxpad[1 : H + 1, 1 : W + 1].permute(2, 0, 1)
        if need_offset_mask:
            grad_offset[b] = goff.T.reshape(offset.shape[1:])
        if need_mask:
            grad_mask[b] = gmsk.T.reshape(mask.shape[1:])
    grad_weight = not_requested(input)
    if need_weight:
        grad_weight = gw.view(pr.groups, g_out, pr.kk, pr.c_per_g).permute(0, 1, 3, 2).reshape(weight.shape)
        grad_weight = grad_weight.to(weight.dtype, memory_format=torch.contiguous_format)
    return grad_input, grad_offset, grad_mask, grad_weight


cpu_deform_conv2d_bwd.register_fake(backward_fake)
register_autograd(cpu_deform_conv2d_fwd, cpu_deform_conv2d_bwd)
