"""Modulated deformable convolution (DCNv2, paper Eq. 6-8): Triton kernels, launchers, ``torch.library`` ops.

Semantics are exactly those of ``torchvision.ops.deform_conv2d``. For output position p = (ho, wo), tap
k = (i, j) and input channel c of offset group og = c // (Cin / G)::

    h = ho * stride_h - pad_h + i * dil_h + offset[b, 2 * (og * kh * kw + k), ho, wo]
    w = wo * stride_w - pad_w + j * dil_w + offset[b, 2 * (og * kh * kw + k) + 1, ho, wo]
    col[b, c, k, p] = mask[b, og * kh * kw + k, ho, wo] * bilinear(input[b, c], h, w)
    out[b, o, p] = bias[o] + sum_{c in group(o), k} weight[o, c - group start, i, j] * col[b, c, k, p]

``bilinear`` is zero when h <= -1, h >= H, w <= -1 or w >= W; otherwise it blends the four floor corners,
each corner outside the image contributing zero. Sample positions are computed in fp32 whatever the
input dtype (torchvision computes them in the input dtype, which loses sub-pixel precision in fp16).

Three kernels, none of which materialises the column tensor ``col`` (C * kh * kw * Ho * Wo):

* ``_deform_conv_fwd_kernel``: implicit GEMM. A program owns a tile of output positions x output
  channels of one (batch, weight group); it loops over taps and input-channel blocks, gathers and
  interpolates the modulated input tile in fp32 and feeds it to ``tl.dot`` (fp32 accumulation).
* ``_deform_conv_bwd_data_kernel``: one pass for grad_input, grad_offset and grad_mask. A program owns a
  tile of positions of one (batch, offset group), so the channel reductions behind grad_offset and
  grad_mask stay inside the program and are stored once (no atomics, deterministic); when that gives too
  few programs for the GPU, the group's channel blocks are split over CSPLIT programs whose fp32
  partials are summed afterwards. The column
  gradient ``W^T grad_out`` is formed tile by tile with ``tl.dot`` and scattered to grad_input through
  the bilinear weights with fp32 atomics (an inverse map pixel -> samples does not exist for arbitrary
  offsets; torchvision's col2im uses atomics as well). grad_input is therefore not bitwise deterministic.
* ``_deform_conv_bwd_weight_kernel``: grad_weight as a GEMM over (batch x positions), split over SPLIT
  programs into an fp32 partial buffer that is summed afterwards (deterministic, no atomics).

grad_bias is a plain reduction of grad_out. Input tensors are read through explicit strides (any layout,
including channels-last and expanded grad_out); outputs are allocated contiguous inside the ops. Address
arithmetic is done in int64 so tensors beyond 2**31 elements are safe.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: Tests set this to fill every kernel-written output with NaN before launch, proving that every element
#: is written. Off in normal use (outputs come from ``torch.empty``).
POISON_OUTPUTS = False

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The interpreter (triton 3.6) multiplies the raw uint16 storage of bf16 operands in tl.dot; there the
# operands are widened to fp32 first, which gives the same exact products and fp32 accumulation.
_BF16_DOT_AS_FP32 = tl.constexpr(_INTERPRET)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------- helpers


@triton.jit
def _bilinear_corners(h, w, H, W, valid):
    """Floor corners of fp32 sample points (h, w) [P] under torchvision's border rule.

    Returns the int64 top-left corner (h_lo, w_lo), the fractional parts (lh, lw) and which of the
    corner rows/columns are usable. Points that are outside (or masked by ``valid``) get all corners
    unusable and lh = lw = 0, so neither values nor offset gradients flow through them.
    """
    inside = valid & (h > -1.0) & (h < H) & (w > -1.0) & (w < W)
    # Far-away (or NaN) points are moved to 0 before the float -> int conversion.
    h = tl.where(inside, h, 0.0)
    w = tl.where(inside, w, 0.0)
    h_lo_f = tl.floor(h)
    w_lo_f = tl.floor(w)
    lh = h - h_lo_f
    lw = w - w_lo_f
    h_lo = h_lo_f.to(tl.int64)
    w_lo = w_lo_f.to(tl.int64)
    ok_h0 = inside & (h_lo >= 0)
    ok_h1 = inside & (h_lo + 1 <= H - 1)
    ok_w0 = w_lo >= 0
    ok_w1 = w_lo + 1 <= W - 1
    return h_lo, w_lo, lh, lw, ok_h0, ok_h1, ok_w0, ok_w1


@triton.jit
def _load_corners(x_c, h_lo, w_lo, sxh, sxw, ok_h0, ok_h1, ok_w0, ok_w1, lanes):
    """The four corner values [P, C] (fp32) for channel base pointers x_c [1, C]; zero where unusable."""
    o = (h_lo * sxh + w_lo * sxw)[:, None]
    ln = lanes[None, :]
    v00 = tl.load(x_c + o, mask=(ok_h0 & ok_w0)[:, None] & ln, other=0.0).to(tl.float32)
    v01 = tl.load(x_c + (o + sxw), mask=(ok_h0 & ok_w1)[:, None] & ln, other=0.0).to(tl.float32)
    v10 = tl.load(x_c + (o + sxh), mask=(ok_h1 & ok_w0)[:, None] & ln, other=0.0).to(tl.float32)
    v11 = tl.load(x_c + (o + sxh + sxw), mask=(ok_h1 & ok_w1)[:, None] & ln, other=0.0).to(tl.float32)
    return v00, v01, v10, v11


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b with fp32 accumulation; fp32 operands use exact (IEEE) products, not TF32, as
    PyTorch's default matmul does."""
    if _BF16_DOT_AS_FP32 and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _sample_tile(
    x_b, off_p, msk_p, c, c_ok, og_lo, og_hi, k, base_h, base_w, H, W, p_ok,
    sxc, sxh, sxw, soc, smc, C_PER_OG,
    KK: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Modulated bilinear samples col[p, c] (fp32, [BLOCK_P, BLOCK_C]) of tap k for channels c [C].

    A channel block may straddle offset groups og_lo..og_hi; each group's sample points are computed
    once ([P]) and applied to that group's lanes only.
    """
    x_c = x_b + c[None, :] * sxc
    val = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for og in range(og_lo, og_hi + 1):
        lanes = c_ok & (c // C_PER_OG == og)
        ch = og * KK + k
        dy = tl.load(off_p + (2 * ch) * soc, mask=p_ok, other=0.0).to(tl.float32)
        dx = tl.load(off_p + (2 * ch + 1) * soc, mask=p_ok, other=0.0).to(tl.float32)
        corners = _bilinear_corners(base_h + dy, base_w + dx, H, W, p_ok)
        h_lo, w_lo, lh, lw, ok_h0, ok_h1, ok_w0, ok_w1 = corners
        v00, v01, v10, v11 = _load_corners(x_c, h_lo, w_lo, sxh, sxw, ok_h0, ok_h1, ok_w0, ok_w1, lanes)
        hh = 1.0 - lh
        hw = 1.0 - lw
        w00 = hh * hw
        w01 = hh * lw
        w10 = lh * hw
        w11 = lh * lw
        if HAS_MASK:
            m = tl.load(msk_p + ch * smc, mask=p_ok, other=0.0).to(tl.float32)
            w00 *= m
            w01 *= m
            w10 *= m
            w11 *= m
        val += w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11
    return val


# --------------------------------------------------------------------------------------------- forward


def _fwd_configs() -> list[triton.Config]:
    """Tile shapes that compile for sm_90 (triton 3.6) in fp32, fp16 and bf16 without register spills
    (checked with cuobjdump -res-usage); larger tiles (128x128) spill."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_P": 16, "BLOCK_N": 16, "BLOCK_C": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_P": bp, "BLOCK_N": bn, "BLOCK_C": bc}, num_warps=nw, num_stages=2)
        for bp, bn, bc, nw in [
            (32, 64, 32, 4),
            (64, 64, 16, 4),
            (64, 64, 32, 4),
            (32, 128, 32, 4),
            (64, 128, 16, 8),
            (64, 128, 32, 8),
            (128, 64, 32, 8),
            (32, 256, 32, 8),
        ]
    ]


@triton.autotune(configs=_fwd_configs(), key=["C_PER_G", "COUT_PER_G", "C_PER_OG", "HO", "WO", "KH", "KW"])
@triton.jit
def _deform_conv_fwd_kernel(
    x_ptr, off_ptr, msk_ptr, w_ptr, bias_ptr, out_ptr,
    H, W, HO, WO, C_PER_G, COUT_PER_G, C_PER_OG, N_GROUPS,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    smb, smc, smh, smw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[b, g*COUT_PER_G + n, p] = bias + sum_{k, c} wt[g, k, c, n] * col[b, g*C_PER_G + c, k, p].

    x [B, C, H, W] (strided), offset [B, 2*G*KK, HO, WO] (strided), mask [B, G*KK, HO, WO] (strided),
    wt [N_GROUPS, KK, C_PER_G, COUT_PER_G] contiguous (weight permuted by the launcher), bias [Cout],
    out [B, Cout, HO, WO] contiguous. Grid: B * N_GROUPS * p-tiles * n-tiles programs, n fastest so that
    programs sharing the same gathered input run together.
    """
    KK: tl.constexpr = KH * KW
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    pid = tl.program_id(0).to(tl.int64)
    n_tiles = tl.cdiv(COUT_PER_G, BLOCK_N)
    p_tiles = tl.cdiv(HO * WO, BLOCK_P)
    pid_n = pid % n_tiles
    pid_p = (pid // n_tiles) % p_tiles
    bg = pid // (n_tiles * p_tiles)
    b = bg // N_GROUPS
    g = bg % N_GROUPS

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HO * WO
    ho = offs_p // WO
    wo = offs_p % WO
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < COUT_PER_G
    x_b = x_ptr + b * sxb
    off_p = off_ptr + b * sob + ho * soh + wo * sow
    msk_p = msk_ptr + b * smb + ho * smh + wo * smw
    c_grp = g * C_PER_G

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k in range(KK):
        base_h = (ho * stride_h - pad_h + (k // KW) * dil_h).to(tl.float32)
        base_w = (wo * stride_w - pad_w + (k % KW) * dil_w).to(tl.float32)
        w_k = w_ptr + (g * KK + k) * C_PER_G * COUT_PER_G
        for c0 in range(0, C_PER_G, BLOCK_C):
            c_loc = c0 + tl.arange(0, BLOCK_C)
            c_ok = c_loc < C_PER_G
            og_lo = (c_grp + c0) // C_PER_OG
            og_hi = (c_grp + tl.minimum(c0 + BLOCK_C, C_PER_G) - 1) // C_PER_OG
            val = _sample_tile(
                x_b, off_p, msk_p, c_grp + c_loc, c_ok, og_lo, og_hi, k, base_h, base_w, H, W, p_ok,
                sxc, sxh, sxw, soc, smc, C_PER_OG, KK, HAS_MASK, BLOCK_P, BLOCK_C,
            )
            wt = tl.load(
                w_k + c_loc[:, None] * COUT_PER_G + offs_n[None, :],
                mask=c_ok[:, None] & n_ok[None, :], other=0.0,
            )
            acc = _dot(val.to(wt.dtype), wt, acc, IEEE)

    co = g * COUT_PER_G + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + (b * N_GROUPS * COUT_PER_G + co)[None, :] * (HO * WO) + offs_p[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------- backward


@triton.jit
def _deform_conv_bwd_data_kernel(
    go_ptr, x_ptr, off_ptr, msk_ptr, w_ptr, gx_ptr, goff_ptr, gmsk_ptr,
    B, H, W, HO, WO, C_PER_G, COUT_PER_G, C_PER_OG, N_OGROUPS, CSPLIT,
    sgb, sgc, sgh, sgw,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    smb, smc, smh, smw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr, NEED_GRAD_INPUT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_input, grad_offset and grad_mask in one pass.

    With gcol[b, c, k, p] = sum_n wt[g(c), k, c, n] * grad_out[b, g(c)*COUT_PER_G + n, p] and the bilinear
    value v = sum_corners a_corner * x_corner (a: bilinear weights)::

        grad_mask[b, og*KK + k, p]        = sum_{c in og} gcol * v
        grad_offset[b, 2*(og*KK + k), p]  = m * sum_{c in og} gcol * dv/dh     (+1: dv/dw)
        grad_input[b, c, corner]         += m * a_corner * gcol                 (fp32 atomics)

    go [B, Cout, HO, WO], x [B, C, H, W], offset, mask strided; wt [groups, KK, C_PER_G, COUT_PER_G],
    gx [B, C, H, W] fp32 zero-initialised; goff [CSPLIT, B, 2*G*KK, HO, WO] and gmsk [CSPLIT, B, G*KK, HO, WO]
    contiguous: partial sums over the channel blocks cs, cs + CSPLIT, ... of the offset group, summed by
    the launcher when CSPLIT > 1 (CSPLIT adds parallelism when B * G * p-tiles is small).
    Grid: B * N_OGROUPS * p-tiles * CSPLIT; each program writes the grad_offset/grad_mask partials of its
    (cs, b, og, p-tile) for every tap, so those outputs need no atomics.
    """
    KK: tl.constexpr = KH * KW
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    pid = tl.program_id(0).to(tl.int64)
    p_tiles = tl.cdiv(HO * WO, BLOCK_P)
    cs = pid % CSPLIT
    pid_p = (pid // CSPLIT) % p_tiles
    bo = pid // (CSPLIT * p_tiles)
    b = bo // N_OGROUPS
    og = bo % N_OGROUPS

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HO * WO
    ho = offs_p // WO
    wo = offs_p % WO
    x_b = x_ptr + b * sxb
    off_p = off_ptr + b * sob + ho * soh + wo * sow
    msk_p = msk_ptr + b * smb + ho * smh + wo * smw
    go_p = go_ptr + b * sgb + ho * sgh + wo * sgw
    c_total = N_OGROUPS * C_PER_OG
    gx_b = gx_ptr + b * c_total * H * W
    c_og = og * C_PER_OG

    for k in range(KK):
        ch = og * KK + k
        dy = tl.load(off_p + (2 * ch) * soc, mask=p_ok, other=0.0).to(tl.float32)
        dx = tl.load(off_p + (2 * ch + 1) * soc, mask=p_ok, other=0.0).to(tl.float32)
        h = (ho * stride_h - pad_h + (k // KW) * dil_h).to(tl.float32) + dy
        w = (wo * stride_w - pad_w + (k % KW) * dil_w).to(tl.float32) + dx
        h_lo, w_lo, lh, lw, ok_h0, ok_h1, ok_w0, ok_w1 = _bilinear_corners(h, w, H, W, p_ok)
        hh = 1.0 - lh
        hw = 1.0 - lw
        if HAS_MASK:
            m = tl.load(msk_p + ch * smc, mask=p_ok, other=0.0).to(tl.float32)
        else:
            m = tl.full((BLOCK_P,), 1.0, tl.float32)
        g_dh = tl.zeros((BLOCK_P,), dtype=tl.float32)
        g_dw = tl.zeros((BLOCK_P,), dtype=tl.float32)
        g_m = tl.zeros((BLOCK_P,), dtype=tl.float32)
        o_gx = (h_lo * W + w_lo)[:, None]

        for c0 in range(cs * BLOCK_C, C_PER_OG, CSPLIT * BLOCK_C):
            c_loc = c0 + tl.arange(0, BLOCK_C)
            c_ok = c_loc < C_PER_OG
            c = c_og + c_loc
            # A channel block may straddle weight groups; each group contributes to its own lanes.
            gr_lo = (c_og + c0) // C_PER_G
            gr_hi = (c_og + tl.minimum(c0 + BLOCK_C, C_PER_OG) - 1) // C_PER_G
            gcol = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            for gr in range(gr_lo, gr_hi + 1):
                lanes = c_ok & (c // C_PER_G == gr)
                w_k = w_ptr + (gr * KK + k) * C_PER_G * COUT_PER_G + (c - gr * C_PER_G)[None, :] * COUT_PER_G
                for n0 in range(0, COUT_PER_G, BLOCK_N):
                    offs_n = n0 + tl.arange(0, BLOCK_N)
                    n_ok = offs_n < COUT_PER_G
                    go = tl.load(
                        go_p[:, None] + (gr * COUT_PER_G + offs_n)[None, :] * sgc,
                        mask=p_ok[:, None] & n_ok[None, :], other=0.0,
                    )
                    wt = tl.load(w_k + offs_n[:, None], mask=n_ok[:, None] & lanes[None, :], other=0.0)
                    gcol = _dot(go, wt, gcol, IEEE)

            v00, v01, v10, v11 = _load_corners(
                x_b + c[None, :] * sxc, h_lo, w_lo, sxh, sxw, ok_h0, ok_h1, ok_w0, ok_w1, c_ok
            )
            bil = hh[:, None] * (hw[:, None] * v00 + lw[:, None] * v01) + lh[:, None] * (
                hw[:, None] * v10 + lw[:, None] * v11
            )
            d_h = hw[:, None] * (v10 - v00) + lw[:, None] * (v11 - v01)
            d_w = hh[:, None] * (v01 - v00) + lh[:, None] * (v11 - v10)
            g_m += tl.sum(gcol * bil, axis=1)
            g_dh += tl.sum(gcol * d_h, axis=1)
            g_dw += tl.sum(gcol * d_w, axis=1)

            if NEED_GRAD_INPUT:
                gm_col = gcol * m[:, None]
                gx_c = gx_b + c[None, :] * (H * W) + o_gx
                # Pure accumulation, read by nobody before the kernel ends: relaxed ordering suffices.
                ln = c_ok[None, :]
                top = hh[:, None] * gm_col
                bot = lh[:, None] * gm_col
                ok_t0 = (ok_h0 & ok_w0)[:, None] & ln
                ok_t1 = (ok_h0 & ok_w1)[:, None] & ln
                ok_b0 = (ok_h1 & ok_w0)[:, None] & ln
                ok_b1 = (ok_h1 & ok_w1)[:, None] & ln
                tl.atomic_add(gx_c, hw[:, None] * top, mask=ok_t0, sem="relaxed")
                tl.atomic_add(gx_c + 1, lw[:, None] * top, mask=ok_t1, sem="relaxed")
                tl.atomic_add(gx_c + W, hw[:, None] * bot, mask=ok_b0, sem="relaxed")
                tl.atomic_add(gx_c + W + 1, lw[:, None] * bot, mask=ok_b1, sem="relaxed")

        goff = goff_ptr + ((cs * B + b) * N_OGROUPS * KK * 2 + 2 * ch) * (HO * WO) + offs_p
        tl.store(goff, (g_dh * m).to(goff_ptr.dtype.element_ty), mask=p_ok)
        tl.store(goff + HO * WO, (g_dw * m).to(goff_ptr.dtype.element_ty), mask=p_ok)
        if HAS_MASK:
            gmsk = gmsk_ptr + ((cs * B + b) * N_OGROUPS * KK + ch) * (HO * WO) + offs_p
            tl.store(gmsk, g_m.to(gmsk_ptr.dtype.element_ty), mask=p_ok)


@triton.jit
def _deform_conv_bwd_weight_kernel(
    go_ptr, x_ptr, off_ptr, msk_ptr, gw_ptr,
    B, H, W, HO, WO, C_PER_G, COUT_PER_G, C_PER_OG, N_GROUPS, SPLIT,
    sgb, sgc, sgh, sgw,
    sxb, sxc, sxh, sxw,
    sob, soc, soh, sow,
    smb, smc, smh, smw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """gw[s, g*COUT_PER_G + n, c, k] = sum over (b, p-tile) numbers s, s + SPLIT, ... of
    grad_out[b, g*COUT_PER_G + n, p] * col[b, g*C_PER_G + c, k, p].

    go [B, Cout, HO, WO], x, offset, mask strided; gw [SPLIT, Cout, C_PER_G, KK] fp32 contiguous, summed
    over SPLIT by the launcher. Grid: N_GROUPS * n-tiles * KK * c-tiles * SPLIT; every element of gw is
    stored by exactly one program.
    """
    KK: tl.constexpr = KH * KW
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    pid = tl.program_id(0).to(tl.int64)
    c_tiles = tl.cdiv(C_PER_G, BLOCK_C)
    n_tiles = tl.cdiv(COUT_PER_G, BLOCK_N)
    s = pid % SPLIT
    r = pid // SPLIT
    cb = r % c_tiles
    r = r // c_tiles
    k = r % KK
    r = r // KK
    nb = r % n_tiles
    g = r // n_tiles

    c_loc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_loc < C_PER_G
    c_grp = g * C_PER_G
    c = c_grp + c_loc
    og_lo = (c_grp + cb * BLOCK_C) // C_PER_OG
    og_hi = (c_grp + tl.minimum((cb + 1) * BLOCK_C, C_PER_G) - 1) // C_PER_OG
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < COUT_PER_G
    co = g * COUT_PER_G + offs_n
    ki = k // KW
    kj = k % KW
    p_tiles = tl.cdiv(HO * WO, BLOCK_P)

    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for t in range(s, B * p_tiles, SPLIT):
        b = t // p_tiles
        offs_p = (t % p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < HO * WO
        ho = offs_p // WO
        wo = offs_p % WO
        base_h = (ho * stride_h - pad_h + ki * dil_h).to(tl.float32)
        base_w = (wo * stride_w - pad_w + kj * dil_w).to(tl.float32)
        val = _sample_tile(
            x_ptr + b * sxb, off_ptr + b * sob + ho * soh + wo * sow, msk_ptr + b * smb + ho * smh + wo * smw,
            c, c_ok, og_lo, og_hi, k, base_h, base_w, H, W, p_ok,
            sxc, sxh, sxw, soc, smc, C_PER_OG, KK, HAS_MASK, BLOCK_P, BLOCK_C,
        )
        go_t = tl.load(
            go_ptr + b * sgb + co[:, None] * sgc + (ho * sgh + wo * sgw)[None, :],
            mask=n_ok[:, None] & p_ok[None, :], other=0.0,
        )
        acc = _dot(go_t, val.to(go_t.dtype), acc, IEEE)

    gw = gw_ptr + ((s * N_GROUPS * COUT_PER_G + co)[:, None] * C_PER_G + c_loc[None, :]) * KK + k
    tl.store(gw, acc, mask=n_ok[:, None] & c_ok[None, :])


# --------------------------------------------------------------------------------------------- launchers


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
    out = _alloc((B, Cout, HO, WO), input.dtype, input.device)
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
        block_p = 16 if _INTERPRET else 64
        block_c = 16 if _INTERPRET else _c_block(C // G, input.dtype)
        base = B * G * triton.cdiv(HO * WO, block_p)
        c_blocks = triton.cdiv(C // G, block_c)
        if _INTERPRET:
            csplit = min(2, c_blocks)
        else:
            target = 4 * torch.cuda.get_device_properties(dev).multi_processor_count
            csplit = max(1, min(c_blocks, triton.cdiv(target, base)))
        # One split: final gradients written directly; several: fp32 partials summed below.
        part_dtype = (lambda t: t.dtype) if csplit == 1 else (lambda t: torch.float32)
        goff = _alloc((csplit * B, 2 * G * KK, HO, WO), part_dtype(offset), dev)
        gmsk = _alloc((csplit * B, G * KK, HO, WO), part_dtype(mask), dev) if mask is not None else goff
        wrap_triton(_deform_conv_bwd_data_kernel)[(base * csplit,)](
            grad_out, input, offset, msk, wt, gx, goff, gmsk,
            B, H, W, HO, WO, c_per_g, cout_per_g, C // G, G, csplit,
            *grad_out.stride(), *input.stride(), *offset.stride(), smb, smc, smh, smw, *convs,
            KH=KH, KW=KW, HAS_MASK=has_mask, NEED_GRAD_INPUT=int(bool(need_input)),
            BLOCK_P=block_p, BLOCK_N=16 if _INTERPRET else _n_block(cout_per_g), BLOCK_C=block_c,
            num_warps=8,
        )
        if need_input:
            grad_input = gx.to(input.dtype)
        if need_offset_mask:
            grad_offset = goff if csplit == 1 else goff.view(csplit, *offset.shape).sum(0).to(offset.dtype)
            if mask is not None:
                grad_mask = gmsk if csplit == 1 else gmsk.view(csplit, *mask.shape).sum(0).to(mask.dtype)

    if need_weight:
        block_p, block_n = (16, 16) if _INTERPRET else (64, _n_block(cout_per_g))
        block_c = 16 if _INTERPRET or min(c_per_g, C // G) <= 16 else 32
        base = groups * triton.cdiv(cout_per_g, block_n) * KK * triton.cdiv(c_per_g, block_c)
        tiles = B * triton.cdiv(HO * WO, block_p)
        if _INTERPRET:
            split = min(2, tiles)
        else:
            target = 4 * torch.cuda.get_device_properties(dev).multi_processor_count
            split = max(1, min(tiles, triton.cdiv(target, base)))
        gw = _alloc((split, Cout, c_per_g, KK), torch.float32, dev)
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


if _INTERPRET:
    # Under TRITON_INTERPRET=1, wrap_triton hands back the interpreted kernel unwrapped, so the ops' bodies
    # cannot be traced with fake tensors. There the ops stay opaque to tracing (explicit fake kernels, no
    # decomposition under functionalization) and run eagerly; on GPU, triton_op's tracing is used.
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def _keep_opaque(mode, op, types, args, kwargs):
        return mode.__torch_dispatch__(op, types, args, kwargs)

    for _op, _fake in ((deform_conv2d_fwd, _fwd_fake), (deform_conv2d_bwd, _bwd_fake)):
        _op.register_fake(_fake)
        _op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
