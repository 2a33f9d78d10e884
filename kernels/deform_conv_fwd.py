"""Forward kernel of the modulated deformable convolution (DCNv2, paper Eq. 6 and 8).

Semantics are exactly those of ``torchvision.ops.deform_conv2d``. For output position p = (ho, wo), tap
k = (i, j) and input channel c of offset group og = c // (Cin / G)::

    h = ho * stride_h - pad_h + i * dil_h + offset[b, 2 * (og * kh * kw + k), ho, wo]
    w = wo * stride_w - pad_w + j * dil_w + offset[b, 2 * (og * kh * kw + k) + 1, ho, wo]
    col[b, c, k, p] = mask[b, og * kh * kw + k, ho, wo] * bilinear(input[b, c], h, w)
    out[b, o, p] = bias[o] + sum_{c in group(o), k} weight[o, c - group start, i, j] * col[b, c, k, p]

``bilinear`` is zero when h <= -1, h >= H, w <= -1 or w >= W; otherwise it blends the four floor corners,
each corner outside the image contributing zero (``kernels/deform_sampling.py``; on -1 exactly the offset
gradient is the one-sided derivative into the image, as torchvision's). Sample positions are computed in
fp32 whatever the input dtype (torchvision computes them in the input dtype, which loses sub-pixel
precision in fp16).

``_deform_conv_fwd_kernel`` is an implicit GEMM that never materialises ``col``: a program owns BLOCK_P
output positions x BLOCK_N (by default all) output channels of one (batch, weight group). For each tap
and each offset group that meets the weight group it computes the sample geometry once, then for every
block of that group's channels gathers the four corners with 16-byte vectors from the channels-last
input, blends them in fp32 and feeds the tile to ``tl.dot`` (tensor cores for bf16/fp16, exact fp32
products for fp32; fp32 accumulation). Launched by ``kernels/deform_conv.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import INTERPRET, dot
from kernels.deform_sampling import blend_weights, corner_values, sample_block, sample_geometry


def _fwd_configs() -> list[triton.Config]:
    """(BLOCK_P, BLOCK_C) x warps. BLOCK_N (the output channels of a program, all of a group up to 256) is
    set by the launcher; :func:`_prune` keeps the configs that fit the shape. Every config left compiles
    without spills at AMSA's shapes (checked by ``python -m bench.sm90`` and its CI test). maxnreg=255:
    without it ptxas may aim at 128 registers for occupancy and spill instead."""
    if INTERPRET:
        return [triton.Config({"BLOCK_P": 16, "BLOCK_C": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=nw, num_stages=1, maxnreg=255)
        for bp, bc, nw in [(64, 16, 4), (64, 32, 4), (64, 32, 8), (64, 64, 8), (128, 16, 8), (128, 32, 8)]
    ]


def _prune(configs, named_args, **kwargs):
    """Configs whose fp32 accumulator (BLOCK_P x BLOCK_N) fits 64 registers per thread, whose channel
    block is no wider than an offset group's channels (rounded up to 16), and, for fp32 (products on
    CUDA cores, both operand tiles in registers), whose weight tile (BLOCK_C x BLOCK_N) fits 32."""
    args = {**named_args, **kwargs}
    bn = args["BLOCK_N"]
    c_og = max(16, triton.next_power_of_2(args["C_PER_OG"]))
    fp32 = getattr(named_args["x_ptr"], "dtype", None) == torch.float32

    def fits(c):
        bp, bc, threads = c.kwargs["BLOCK_P"], c.kwargs["BLOCK_C"], 32 * c.num_warps
        return bp * bn <= 64 * threads and bc <= c_og and not (fp32 and bc * bn > 32 * threads)

    return [c for c in configs if fits(c)] or [min(configs, key=lambda c: c.kwargs["BLOCK_C"])]


def _packed(args) -> int:
    """Offset groups per channel block: BLOCK_C / C_PER_OG where an offset group is narrower than a block
    (a power of two of channels, inside one weight group), so that blocks hold whole offset groups;
    else 1 (a block lies inside one offset group)."""
    cpo, bc = args["C_PER_OG"], args["BLOCK_C"]
    if cpo < bc and cpo & (cpo - 1) == 0 and args["C_PER_G"] % cpo == 0:
        return bc // cpo
    return 1


@triton.jit
def _packed_tap(acc, x_b, off_b, msk_b, w_k, k, og_lo, og_hi, c_grp, offs_p, ho, wo, p_ok, offs_n, n_ok,
                H, W, HOWO, COUT_PER_G, sxc, sxh, sxw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                C_PER_OG: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PACK: tl.constexpr, IEEE: tl.constexpr):
    """Tap k when a channel block holds PACK whole offset groups of C_PER_OG channels: the geometries of
    the block's groups [P, PACK] at once, the corners gathered as [P, PACK, C_PER_OG] (16-byte vectors
    within each group), one dot per block."""
    for og0 in range(og_lo, og_hi + 1, PACK):
        og = og0 + tl.arange(0, PACK)
        og_ok = og <= og_hi
        o00, lh, lw, m, ok_h0, ok_h1, ok_w0, ok_w1 = sample_geometry(
            off_b, msk_b, og[None, :], k, offs_p[:, None], ho[:, None], wo[:, None],
            p_ok[:, None] & og_ok[None, :], H, W, HOWO, sxh, sxw, stride_h, stride_w, pad_h, pad_w,
            dil_h, dil_w, KH, KW, HAS_MASK)
        a00, a01, a10, a11 = blend_weights(lh, lw, m)
        c = og[None, :, None] * C_PER_OG + tl.arange(0, C_PER_OG)[None, None, :]  # [1, PACK, C_PER_OG]
        x_c = x_b + c * sxc
        v00, v01, v10, v11 = corner_values(x_c, o00[:, :, None], sxh, sxw, (ok_h0 & ok_w0)[:, :, None],
                                           (ok_h0 & ok_w1)[:, :, None], (ok_h1 & ok_w0)[:, :, None],
                                           (ok_h1 & ok_w1)[:, :, None])
        v = a00[:, :, None] * v00 + a01[:, :, None] * v01 + a10[:, :, None] * v10 + a11[:, :, None] * v11
        cc = og0 * C_PER_OG + tl.arange(0, BLOCK_C)
        c_ok = cc < (og_hi + 1) * C_PER_OG
        wt = tl.load(w_k + (cc - c_grp)[:, None] * COUT_PER_G + offs_n[None, :],
                     mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot(tl.reshape(v, [BLOCK_P, BLOCK_C]).to(wt.dtype), wt, acc, IEEE)
    return acc


@triton.autotune(configs=_fwd_configs(), key=["C_PER_G", "COUT_PER_G", "C_PER_OG", "HO", "WO", "KH", "KW"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"PACK": _packed})
@triton.jit
def _deform_conv_fwd_kernel(
    x_ptr, off_ptr, msk_ptr, w_ptr, bias_ptr, out_ptr,
    H, W, HO, WO, C_PER_G, COUT_PER_G, N_GROUPS, G,
    sxb, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    C_PER_OG: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    PACK: tl.constexpr,
):
    """out[b, g*COUT_PER_G + n, p] = bias + sum_{k, c} wt[g, k, c, n] * col[b, g*C_PER_G + c, k, p].

    x [B, C, H, W] read through strides (channels-last: sxc = 1), offset [B, 2*G*KK, HO, WO] and mask
    [B, G*KK, HO, WO] contiguous, wt [N_GROUPS, KK, C_PER_G, COUT_PER_G] contiguous (the weight permuted
    by the launcher), bias [Cout], out [B, Cout, HO, WO] contiguous. Grid: (p-tiles, B * N_GROUPS *
    n-tiles). C_PER_OG is a constexpr, so that the channel masks of a block are provably constant over
    16 bytes (vector gathers) whatever the offset groups. PACK > 1: a channel block holds PACK whole
    offset groups, whose geometries are computed together ([P, PACK])."""
    KK: tl.constexpr = KH * KW
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    HOWO = HO * WO
    n_tiles = tl.cdiv(COUT_PER_G, BLOCK_N)
    r = tl.program_id(1)
    nb = r % n_tiles
    g = (r // n_tiles) % N_GROUPS
    b = (r // n_tiles // N_GROUPS).to(tl.int64)

    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HOWO
    ho = offs_p // WO
    wo = offs_p % WO
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < COUT_PER_G
    x_b = x_ptr + b * sxb
    off_b = off_ptr + b * (2 * G * KK) * HOWO
    msk_b = msk_ptr + b * (G * KK) * HOWO
    c_grp = g * C_PER_G  # first input channel of the weight group
    og_lo = c_grp // C_PER_OG
    og_hi = (c_grp + C_PER_G - 1) // C_PER_OG

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k in range(KK):
        w_k = w_ptr + (g * KK + k) * C_PER_G * COUT_PER_G
        if PACK > 1:
            acc = _packed_tap(acc, x_b, off_b, msk_b, w_k, k, og_lo, og_hi, c_grp, offs_p, ho, wo, p_ok,
                              offs_n, n_ok, H, W, HOWO, COUT_PER_G, sxc, sxh, sxw,
                              stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, C_PER_OG, KH, KW, HAS_MASK,
                              BLOCK_P, BLOCK_C, PACK, IEEE)
        else:
            for og in range(og_lo, og_hi + 1):
                o00, lh, lw, m, ok_h0, ok_h1, ok_w0, ok_w1 = sample_geometry(
                    off_b, msk_b, og, k, offs_p, ho, wo, p_ok, H, W, HOWO, sxh, sxw,
                    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW, HAS_MASK)
                a00, a01, a10, a11 = blend_weights(lh, lw, m)
                c_end = tl.minimum(c_grp + C_PER_G, (og + 1) * C_PER_OG)  # this group's channels of og
                for c0 in range(tl.maximum(c_grp, og * C_PER_OG), c_end, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    c_ok = c < c_end
                    val = sample_block(x_b + c[None, :] * sxc, o00, a00, a01, a10, a11, sxh, sxw,
                                       ok_h0, ok_h1, ok_w0, ok_w1, c_ok)
                    wt = tl.load(w_k + (c - c_grp)[:, None] * COUT_PER_G + offs_n[None, :],
                                 mask=c_ok[:, None] & n_ok[None, :], other=0.0)
                    acc = dot(val.to(wt.dtype), wt, acc, IEEE)

    co = g * COUT_PER_G + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + (b * N_GROUPS * COUT_PER_G + co)[None, :] * HOWO + offs_p[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & n_ok[None, :])
