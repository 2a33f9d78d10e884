"""Bilinear sampling shared by the deformable-convolution kernels (paper Eq. 6-8), under torchvision's
border rule: a sample point (h, w) with -1 <= h < H and -1 <= w < W blends its four floor corners, each
corner outside the image contributing zero; any other point reads nothing. On h = -1 (w = -1) exactly the
value is 0 either way, and the offset gradient is the one-sided derivative into the image, as
torchvision's. Points are fp32."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bilinear_corners(h, w, H, W, valid):
    """Floor corners of fp32 sample points (h, w) [P] under torchvision's border rule.

    Returns the int64 top-left corner (h_lo, w_lo), the fractional parts (lh, lw) and which of the
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
    h_lo = h_lo_f.to(tl.int64)
    w_lo = w_lo_f.to(tl.int64)
    ok_h0 = inside & (h_lo >= 0)
    ok_h1 = inside & (h_lo + 1 <= H - 1)
    ok_w0 = w_lo >= 0
    ok_w1 = w_lo + 1 <= W - 1
    return h_lo, w_lo, lh, lw, ok_h0, ok_h1, ok_w0, ok_w1


@triton.jit
def load_corners(x_c, h_lo, w_lo, sxh, sxw, ok_h0, ok_h1, ok_w0, ok_w1, lanes):
    """The four corner values [P, C] (fp32) for channel base pointers x_c [1, C]; zero where unusable."""
    o = (h_lo * sxh + w_lo * sxw)[:, None]
    ln = lanes[None, :]
    v00 = tl.load(x_c + o, mask=(ok_h0 & ok_w0)[:, None] & ln, other=0.0).to(tl.float32)
    v01 = tl.load(x_c + (o + sxw), mask=(ok_h0 & ok_w1)[:, None] & ln, other=0.0).to(tl.float32)
    v10 = tl.load(x_c + (o + sxh), mask=(ok_h1 & ok_w0)[:, None] & ln, other=0.0).to(tl.float32)
    v11 = tl.load(x_c + (o + sxh + sxw), mask=(ok_h1 & ok_w1)[:, None] & ln, other=0.0).to(tl.float32)
    return v00, v01, v10, v11


@triton.jit
def sample_tile(
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
        corners = bilinear_corners(base_h + dy, base_w + dx, H, W, p_ok)
        h_lo, w_lo, lh, lw, ok_h0, ok_h1, ok_w0, ok_w1 = corners
        v00, v01, v10, v11 = load_corners(x_c, h_lo, w_lo, sxh, sxw, ok_h0, ok_h1, ok_w0, ok_w1, lanes)
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
