"""Backward kernels of the modulated deformable convolution (DCNv2, paper Eq. 6-8), semantics in
``kernels/deform_conv_fwd.py``; launched by ``kernels/deform_conv.py``.

* ``_deform_conv_bwd_data_kernel``: one pass for grad_input, grad_offset and grad_mask. A program owns a
  tile of positions of one (batch, offset group), so the channel reductions behind grad_offset and
  grad_mask stay inside the program and are stored once (no atomics, deterministic); when that gives too
  few programs for the GPU, the group's channel blocks are split over CSPLIT programs whose fp32
  partials are summed afterwards. The column gradient ``W^T grad_out`` is formed tile by tile with
  ``tl.dot`` and scattered to grad_input through the bilinear weights with fp32 atomics (an inverse map
  pixel -> samples does not exist for arbitrary offsets; torchvision's col2im uses atomics as well).
  grad_input is therefore not bitwise deterministic.
* ``_deform_conv_bwd_weight_kernel``: grad_weight as a GEMM over (batch x positions), split over SPLIT
  programs into an fp32 partial buffer that is summed afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels._common import dot
from kernels.deform_sampling import bilinear_corners, load_corners, sample_tile


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
        h_lo, w_lo, lh, lw, ok_h0, ok_h1, ok_w0, ok_w1 = bilinear_corners(h, w, H, W, p_ok)
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
                    gcol = dot(go, wt, gcol, IEEE)

            v00, v01, v10, v11 = load_corners(
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
        val = sample_tile(
            x_ptr + b * sxb, off_ptr + b * sob + ho * soh + wo * sow, msk_ptr + b * smb + ho * smh + wo * smw,
            c, c_ok, og_lo, og_hi, k, base_h, base_w, H, W, p_ok,
            sxc, sxh, sxw, soc, smc, C_PER_OG, KK, HAS_MASK, BLOCK_P, BLOCK_C,
        )
        go_t = tl.load(
            go_ptr + b * sgb + co[:, None] * sgc + (ho * sgh + wo * sgw)[None, :],
            mask=n_ok[:, None] & p_ok[None, :], other=0.0,
        )
        acc = dot(go_t, val.to(go_t.dtype), acc, IEEE)

    gw = gw_ptr + ((s * N_GROUPS * COUT_PER_G + co)[:, None] * C_PER_G + c_loc[None, :]) * KK + k
    tl.store(gw, acc, mask=n_ok[:, None] & c_ok[None, :])
