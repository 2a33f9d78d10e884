"""Backward kernels of the modulated deformable convolution (DCNv2, paper Eq. 6-8), semantics in
``kernels/deform_conv_fwd.py``; launched by ``kernels/deform_conv.py``.

* ``_deform_conv_bwd_data_kernel``: one pass for grad_input, grad_offset and grad_mask. A program owns a
  tile of positions of one (batch, offset group) and the part of the group's channels that lies in one
  weight group (a segment; one per group unless groups and offset groups interleave). It loads its
  grad_out tile (all the weight group's output channels) once, and for every tap computes the sample
  geometry once; per block of channels the column gradient ``W_k^T grad_out`` comes from ``tl.dot``, the
  four corners are gathered with 16-byte vectors from the channels-last input, the channel reductions
  behind grad_offset and grad_mask stay in the program (stored once per tap, no atomics, deterministic),
  and grad_input (fp32, channels-last) receives 16-byte vector atomics (an inverse map pixel -> samples
  does not exist for arbitrary offsets; torchvision's col2im uses atomics as well): grad_input is not
  bitwise deterministic. When a group's channels span several segments, or CSPLIT programs share a
  group's channel blocks (more parallelism when B * G * p-tiles is small), each writes an fp32 partial of
  grad_offset / grad_mask that the launcher sums.
* ``_deform_conv_bwd_weight_kernel``: grad_weight as a GEMM over (batch x positions): a program owns one
  (weight group, tap, channel block) and all the group's output channels, so each sample is gathered
  once for all of them; split over SPLIT programs into an fp32 partial buffer summed afterwards
  (deterministic, no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels._common import INTERPRET, dot
from kernels.deform_sampling import blend_weights, corner_masks, corner_values, sample_block, sample_geometry


def _one_config() -> list[triton.Config]:
    """8 warps, no software pipelining (the loads are gathers), and maxnreg=255: without it ptxas may aim
    at 128 registers for occupancy and spill instead (seen in fp32 at 64 channels)."""
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=8, num_stages=1, maxnreg=255)]


@triton.autotune(configs=_one_config(), key=[])
@triton.jit
def _deform_conv_bwd_data_kernel(
    go_ptr, x_ptr, off_ptr, msk_ptr, w_ptr, gx_ptr, goff_ptr, gmsk_ptr,
    B, H, W, HO, WO, C_PER_G, COUT_PER_G, N_GROUPS, G, CSPLIT, NSEG,
    sxb, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    C_PER_OG: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
    NEED_GRAD_INPUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ONE_N: tl.constexpr,
):
    """grad_input, grad_offset and grad_mask in one pass (C_PER_OG a constexpr: the channel masks are then
    provably constant over 16 bytes, so the corner gathers are vectors even for narrow offset groups).

    With gcol[b, c, k, p] = sum_n wt[g(c), k, c, n] * grad_out[b, g(c)*COUT_PER_G + n, p] and the bilinear
    value v = sum_corners a_corner * x_corner (a: bilinear weights)::

        grad_mask[b, og*KK + k, p]        = sum_{c in og} gcol * v
        grad_offset[b, 2*(og*KK + k), p]  = m * sum_{c in og} gcol * dv/dh     (+1: dv/dw)
        grad_input[b, c, corner]         += m * a_corner * gcol                 (fp32 vector atomics)

    go [B, Cout, HO, WO], offset, mask contiguous; x channels-last [B, C, H, W] (strides sx*, sxc = 1); wt
    [N_GROUPS, KK, C_PER_G, COUT_PER_G]; gx fp32 zero-initialised, with the strides of x; goff
    [S, B, 2*G*KK, HO, WO], gmsk [S, B, G*KK, HO, WO] with S = CSPLIT * NSEG partial slots (S = 1: the
    final gradients). Grid: (p-tiles, B * G * NSEG * CSPLIT). ONE_N: all COUT_PER_G output channels fit
    BLOCK_N, so the grad_out tile is loaded once for all taps and channel blocks.
    """
    KK: tl.constexpr = KH * KW
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    HOWO = HO * WO
    r = tl.program_id(1)
    cs = r % CSPLIT
    seg = (r // CSPLIT) % NSEG
    og = (r // (CSPLIT * NSEG)) % G
    b = (r // (CSPLIT * NSEG * G)).to(tl.int64)
    slot = cs * NSEG + seg

    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HOWO
    ho = offs_p // WO
    wo = offs_p % WO
    # This program's channels: offset group og within weight group gr. A group meeting fewer than NSEG
    # weight groups has empty segments (c_lo >= c_hi), whose gr may be past the last group: nothing of
    # such a program's weight group is read (its slot gets zeros).
    c_og = og * C_PER_OG
    gr = c_og // C_PER_G + seg
    c_lo = tl.maximum(c_og, gr * C_PER_G)
    c_hi = tl.minimum(c_og + C_PER_OG, (gr + 1) * C_PER_G)
    x_b = x_ptr + b * sxb
    off_b = off_ptr + b * (2 * G * KK) * HOWO
    msk_b = msk_ptr + b * (G * KK) * HOWO
    go_b = go_ptr + (b * N_GROUPS + gr) * COUT_PER_G * HOWO
    gx_b = gx_ptr + b * sxb  # grad_input has the (channels-last) layout of x
    offs_n = tl.arange(0, BLOCK_N)
    if ONE_N:
        n_load = tl.where(c_lo < c_hi, COUT_PER_G, 0)  # an empty segment reads no grad_out
        gout = tl.load(go_b + offs_n[None, :] * HOWO + offs_p[:, None],
                       mask=p_ok[:, None] & (offs_n < n_load)[None, :], other=0.0)

    for k in range(KK):
        o00, lh, lw, m, ok_h0, ok_h1, ok_w0, ok_w1 = sample_geometry(
            off_b, msk_b, og, k, offs_p, ho, wo, p_ok, H, W, HOWO, sxh, sxw,
            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW, HAS_MASK)
        hh = 1.0 - lh
        hw = 1.0 - lw
        g_dh = tl.zeros((BLOCK_P,), dtype=tl.float32)
        g_dw = tl.zeros((BLOCK_P,), dtype=tl.float32)
        g_m = tl.zeros((BLOCK_P,), dtype=tl.float32)
        w_k = w_ptr + (gr * KK + k) * C_PER_G * COUT_PER_G
        for c0 in range(c_lo + cs * BLOCK_C, c_hi, CSPLIT * BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < c_hi
            w_c = w_k + (c - gr * C_PER_G)[None, :] * COUT_PER_G
            if ONE_N:
                wt = tl.load(w_c + offs_n[:, None], mask=(offs_n < COUT_PER_G)[:, None] & c_ok[None, :],
                             other=0.0)
                gcol = dot(gout, wt, tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32), IEEE)
            else:
                gcol = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
                for n0 in range(0, COUT_PER_G, BLOCK_N):
                    n = n0 + offs_n
                    n_ok = n < COUT_PER_G
                    go = tl.load(go_b + n[None, :] * HOWO + offs_p[:, None],
                                 mask=p_ok[:, None] & n_ok[None, :], other=0.0)
                    wt = tl.load(w_c + n[:, None], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
                    gcol = dot(go, wt, gcol, IEEE)

            ok00, ok01, ok10, ok11 = corner_masks(ok_h0, ok_h1, ok_w0, ok_w1, c_ok)
            v00, v01, v10, v11 = corner_values(x_b + c[None, :] * sxc, o00[:, None], sxh, sxw,
                                               ok00, ok01, ok10, ok11)
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
                gx_c = gx_b + (o00[:, None] + c[None, :] * sxc)
                # Pure accumulation, read by nobody before the kernel ends: relaxed ordering suffices.
                top = hh[:, None] * gm_col
                bot = lh[:, None] * gm_col
                tl.atomic_add(gx_c, hw[:, None] * top, mask=ok00, sem="relaxed")
                tl.atomic_add(gx_c + sxw, lw[:, None] * top, mask=ok01, sem="relaxed")
                tl.atomic_add(gx_c + sxh, hw[:, None] * bot, mask=ok10, sem="relaxed")
                tl.atomic_add(gx_c + (sxh + sxw), lw[:, None] * bot, mask=ok11, sem="relaxed")

        ch = og * KK + k
        goff = goff_ptr + ((slot * B + b) * (2 * G * KK) + 2 * ch) * HOWO + offs_p
        tl.store(goff, (g_dh * m).to(goff_ptr.dtype.element_ty), mask=p_ok)
        tl.store(goff + HOWO, (g_dw * m).to(goff_ptr.dtype.element_ty), mask=p_ok)
        if HAS_MASK:
            gmsk = gmsk_ptr + ((slot * B + b) * (G * KK) + ch) * HOWO + offs_p
            tl.store(gmsk, g_m.to(gmsk_ptr.dtype.element_ty), mask=p_ok)


@triton.autotune(configs=_one_config(), key=[])
@triton.jit
def _deform_conv_bwd_weight_kernel(
    go_ptr, x_ptr, off_ptr, msk_ptr, gw_ptr,
    B, H, W, HO, WO, C_PER_G, COUT_PER_G, N_GROUPS, G, SPLIT,
    sxb, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    C_PER_OG: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """gw[s, g*COUT_PER_G + n, c, k] = sum over (b, p-tile) numbers s, s + SPLIT, ... of
    grad_out[b, g*COUT_PER_G + n, p] * col[b, g*C_PER_G + c, k, p].

    go [B, Cout, HO, WO], offset, mask contiguous, x through strides (channels-last); gw [SPLIT, Cout,
    C_PER_G, KK] fp32 contiguous, summed over SPLIT by the launcher. Grid: (SPLIT, N_GROUPS * n-tiles *
    KK * c-tiles); every element of gw is stored by exactly one program. A channel block may straddle
    offset groups: each group's geometry is computed once per tile and applied to its lanes only.
    """
    KK: tl.constexpr = KH * KW
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    HOWO = HO * WO
    s = tl.program_id(0)
    r = tl.program_id(1)
    c_tiles = tl.cdiv(C_PER_G, BLOCK_C)
    n_tiles = tl.cdiv(COUT_PER_G, BLOCK_N)
    cb = r % c_tiles
    k = (r // c_tiles) % KK
    nb = (r // (c_tiles * KK)) % n_tiles
    g = r // (c_tiles * KK * n_tiles)

    c_loc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_loc < C_PER_G
    c = g * C_PER_G + c_loc
    og_lo = (g * C_PER_G + cb * BLOCK_C) // C_PER_OG
    og_hi = (g * C_PER_G + tl.minimum((cb + 1) * BLOCK_C, C_PER_G) - 1) // C_PER_OG
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < COUT_PER_G
    co = g * COUT_PER_G + offs_n
    p_tiles = tl.cdiv(HOWO, BLOCK_P)

    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for t in range(s, B * p_tiles, SPLIT):
        b = (t // p_tiles).to(tl.int64)
        offs_p = (t % p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < HOWO
        ho = offs_p // WO
        wo = offs_p % WO
        x_c = x_ptr + b * sxb + c[None, :] * sxc
        off_b = off_ptr + b * (2 * G * KK) * HOWO
        msk_b = msk_ptr + b * (G * KK) * HOWO
        val = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for og in range(og_lo, og_hi + 1):
            o00, lh, lw, m, ok_h0, ok_h1, ok_w0, ok_w1 = sample_geometry(
                off_b, msk_b, og, k, offs_p, ho, wo, p_ok, H, W, HOWO, sxh, sxw,
                stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW, HAS_MASK)
            a00, a01, a10, a11 = blend_weights(lh, lw, m)
            lanes = c_ok & (c // C_PER_OG == og)
            val += sample_block(x_c, o00, a00, a01, a10, a11, sxh, sxw, ok_h0, ok_h1, ok_w0, ok_w1, lanes)
        go_t = tl.load(go_ptr + (b * N_GROUPS * COUT_PER_G + co)[:, None] * HOWO + offs_p[None, :],
                       mask=n_ok[:, None] & p_ok[None, :], other=0.0)
        acc = dot(go_t, val.to(go_t.dtype), acc, IEEE)

    gw = gw_ptr + ((s * N_GROUPS * COUT_PER_G + co)[:, None] * C_PER_G + c_loc[None, :]) * KK + k
    tl.store(gw, acc, mask=n_ok[:, None] & c_ok[None, :])
