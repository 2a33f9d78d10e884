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

``_deform_conv_fwd_kernel`` is an implicit GEMM that never materialises ``col``: a program owns a tile of
output positions x output channels of one (batch, weight group); it loops over taps and input-channel
blocks, gathers and interpolates the modulated input tile in fp32 and feeds it to ``tl.dot`` (fp32
accumulation). Launched by ``kernels/deform_conv.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels._common import INTERPRET, dot
from kernels.deform_sampling import sample_tile


def _fwd_configs() -> list[triton.Config]:
    """Tile shapes that compile for sm_90 (triton 3.6) in fp32, fp16 and bf16 without register spills
    (checked with cuobjdump -res-usage); larger tiles (128x128) spill."""
    if INTERPRET:
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
            val = sample_tile(
                x_b, off_p, msk_p, c_grp + c_loc, c_ok, og_lo, og_hi, k, base_h, base_w, H, W, p_ok,
                sxc, sxh, sxw, soc, smc, C_PER_OG, KK, HAS_MASK, BLOCK_P, BLOCK_C,
            )
            wt = tl.load(
                w_k + c_loc[:, None] * COUT_PER_G + offs_n[None, :],
                mask=c_ok[:, None] & n_ok[None, :], other=0.0,
            )
            acc = dot(val.to(wt.dtype), wt, acc, IEEE)

    co = g * COUT_PER_G + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + (b * N_GROUPS * COUT_PER_G + co)[None, :] * (HO * WO) + offs_p[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & n_ok[None, :])
