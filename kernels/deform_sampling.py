"""Bilinear sampling shared by the deformable-convolution kernels (paper Eq. 6-8), under torchvision's
border rule: a sample point (h, w) with -1 <= h < H and -1 <= w < W blends its four floor corners, each
corner outside the image contributing zero; any other point reads nothing. On h = -1 (w = -1) exactly the
value is 0 either way, and the offset gradient is the one-sided derivative into the image, as
torchvision's. Points are fp32.

The input is read channels-last (unit channel stride), so a corner of a block of channels is one
16-byte-vector load per lane. The geometry of a sample (its corner offsets, bilinear weights and which
corners exist) depends only on the pixel, the tap and the offset group: :func:`sample_geometry` computes it
once, and every channel block of the group reuses it (:func:`corner_values`, :func:`sample_block`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bilinear_corners(h, w, H, W, valid):
    """Floor corners of fp32 sample points (h, w) [P] under torchvision's border rule.

    Returns the int32 top-left corner (h_lo, w_lo), the fractional parts (lh, lw) and which of the
    corner rows/columns are usable. Points that are outside (or masked by ``valid``) get all corners
    unusable and lh = lw = 0, so neither values nor offset gradients flow through them.
    """
    # -1 itself is inside: the value there is 0 (its only usable corners have weight 0), but the offset
    # gradient is torchvision's one-sided derivative into the image.
    inside = valid & (h >= -1.0) & (h < H) & (w >= -1.0) & (w < W)
    # Far-away (or NaN) points are moved to 0 before the float -> int conversion.
    h = tl.where(inside, h, 0.0)
    w = tl.where(inside, w, 0.0)
    h_lo_f = tl.floor(h)
    w_lo_f = tl.floor(w)
    lh = h - h_lo_f
    lw = w - w_lo_f
    h_lo = h_lo_f.to(tl.int32)
    w_lo = w_lo_f.to(tl.int32)
    ok_h0 = inside & (h_lo >= 0)
    ok_h1 = inside & (h_lo + 1 <= H - 1)
    ok_w0 = w_lo >= 0
    ok_w1 = w_lo + 1 <= W - 1
    return h_lo, w_lo, lh, lw, ok_h0, ok_h1, ok_w0, ok_w1


@triton.jit
def sample_geometry(off_b, msk_b, og, k, p, ho, wo, p_ok, H, W, HOWO, sxh, sxw,
                    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                    KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr):
    """Geometry of tap k of offset group og at the output pixels p = (ho, wo) [P]: the int64 element
    offset of the top-left corner, the bilinear fractions (lh, lw), the modulation m (1 without a mask)
    and which corner rows/columns exist.

    off_b, msk_b: this sample's offsets [2*G*KK, HO*WO] and mask [G*KK, HO*WO] (contiguous)."""
    ch = tl.cast(og * (KH * KW) + k, tl.int64)  # og, k: loop counters (Python ints when interpreted)
    dy = tl.load(off_b + (2 * ch) * HOWO + p, mask=p_ok, other=0.0).to(tl.float32)
    dx = tl.load(off_b + (2 * ch + 1) * HOWO + p, mask=p_ok, other=0.0).to(tl.float32)
    h = (ho * stride_h - pad_h + (k // KW) * dil_h).to(tl.float32) + dy
    w = (wo * stride_w - pad_w + (k % KW) * dil_w).to(tl.float32) + dx
    h_lo, w_lo, lh, lw, ok_h0, ok_h1, ok_w0, ok_w1 = bilinear_corners(h, w, H, W, p_ok)
    o00 = h_lo.to(tl.int64) * sxh + w_lo.to(tl.int64) * sxw
    if HAS_MASK:
        m = tl.load(msk_b + ch * HOWO + p, mask=p_ok, other=0.0).to(tl.float32)
    else:
        m = tl.full(lh.shape, 1.0, tl.float32)
    return o00, lh, lw, m, ok_h0, ok_h1, ok_w0, ok_w1


@triton.jit
def blend_weights(lh, lw, m):
    """Modulated bilinear weights of the four corners (00, 01, 10, 11), [P] each."""
    hh = 1.0 - lh
    hw = 1.0 - lw
    return m * hh * hw, m * hh * lw, m * lh * hw, m * lh * lw


@triton.jit
def sample_block(x_c, o00, a00, a01, a10, a11, sxh, sxw, ok_h0, ok_h1, ok_w0, ok_w1, lanes):
    """Modulated bilinear samples [P, C] (fp32) of the channels x_c [1, C] from a sample geometry."""
    ok00, ok01, ok10, ok11 = corner_masks(ok_h0, ok_h1, ok_w0, ok_w1, lanes)
    v00, v01, v10, v11 = corner_values(x_c, o00[:, None], sxh, sxw, ok00, ok01, ok10, ok11)
    return a00[:, None] * v00 + a01[:, None] * v01 + a10[:, None] * v10 + a11[:, None] * v11


@triton.jit
def corner_values(x_c, o, sxh, sxw, ok00, ok01, ok10, ok11):
    """The four corner values (fp32) at channel pointers x_c and top-left offsets o (broadcast to one
    shape, channels last); zero where a corner's mask ok.. is off (no corner, or an unused lane)."""
    v00 = tl.load(x_c + o, mask=ok00, other=0.0).to(tl.float32)
    v01 = tl.load(x_c + (o + sxw), mask=ok01, other=0.0).to(tl.float32)
    v10 = tl.load(x_c + (o + sxh), mask=ok10, other=0.0).to(tl.float32)
    v11 = tl.load(x_c + (o + sxh + sxw), mask=ok11, other=0.0).to(tl.float32)
    return v00, v01, v10, v11


@triton.jit
def corner_masks(ok_h0, ok_h1, ok_w0, ok_w1, lanes):
    """Masks [P, C] of the four corners for per-pixel corner flags [P] and channel lanes [C]."""
    ln = lanes[None, :]
    return ((ok_h0 & ok_w0)[:, None] & ln, (ok_h0 & ok_w1)[:, None] & ln, (ok_h1 & ok_w0)[:, None] & ln,
            (ok_h1 & ok_w1)[:, None] & ln)
