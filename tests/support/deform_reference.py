"""Modulated deformable convolution (paper Eq. 6-8) written out in float64, independent of the library,
and the problems (shapes, offsets) the deformable-op tests run."""

import math

import torch


def reference_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask):
    """DCNv2 written out: loops over offset groups and taps, explicit bilinear corners and weights.

    Independent of amsa.deform (no shared helpers). Differentiable; the floor corners are constants.
    """
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    B, C, H, W = x.shape
    Cout, cpg, kh, kw = weight.shape
    groups = C // cpg
    G = offset.shape[1] // (2 * kh * kw)
    Ho, Wo = offset.shape[2:]
    cog = C // G
    ho = torch.arange(Ho, dtype=x.dtype, device=x.device)[:, None]
    wo = torch.arange(Wo, dtype=x.dtype, device=x.device)[None, :]
    bi = torch.arange(B, device=x.device)[:, None, None, None]
    ci = torch.arange(cog, device=x.device)[None, :, None, None]
    per_group = []
    for g in range(G):
        xs = x[:, g * cog : (g + 1) * cog]
        taps = []
        for i in range(kh):
            for j in range(kw):
                k = g * kh * kw + i * kw + j
                h = ho * sh - ph + i * dh + offset[:, 2 * k]
                w = wo * sw - pw + j * dw + offset[:, 2 * k + 1]
                # torchvision's rule: points on -1 exactly blend their corners too (value 0, one-sided
                # gradient into the image); points beyond -1 or at H (W) sample nothing
                inside = (h >= -1) & (h < H) & (w >= -1) & (w < W)
                h0 = torch.floor(h.detach())
                w0 = torch.floor(w.detach())
                val = 0
                for yy, wy in ((h0, 1 - (h - h0)), (h0 + 1, h - h0)):
                    for xx, wx in ((w0, 1 - (w - w0)), (w0 + 1, w - w0)):
                        ok = inside & (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
                        yi = torch.where(ok, yy, 0).long()[:, None]
                        xi = torch.where(ok, xx, 0).long()[:, None]
                        corner = xs[bi, ci, yi, xi]  # [B, cog, Ho, Wo]
                        val = val + torch.where(ok, wy * wx, 0)[:, None] * corner
                if mask is not None:
                    val = val * mask[:, k][:, None]
                taps.append(val)
        per_group.append(torch.stack(taps, 2))  # [B, cog, kh*kw, Ho, Wo]
    cols = torch.cat(per_group, 1)
    outs = []
    copg = Cout // groups
    for gr in range(groups):
        wg = weight[gr * copg : (gr + 1) * copg].reshape(copg, cpg, kh * kw)
        outs.append(torch.einsum("bckhw,ock->bohw", cols[:, gr * cpg : (gr + 1) * cpg], wg))
    out = torch.cat(outs, 1)
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


# (B, Cin, H, W, Cout, kernel, stride, padding, dilation, groups, offset groups, mask, bias)
CASES = {
    "3x3": (2, 4, 5, 6, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),
    "1x1": (1, 3, 4, 5, 2, (1, 1), (1, 1), (0, 0), (1, 1), 1, 1, True, True),
    "2x3_stride_dil": (2, 4, 7, 6, 4, (2, 3), (2, 1), (1, 2), (2, 1), 1, 2, True, False),
    "groups": (1, 6, 5, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2, 3, True, True),
    "offset_groups_nomask": (2, 4, 4, 5, 2, (3, 3), (1, 2), (1, 1), (1, 1), 1, 4, False, True),
    "groups_straddle": (1, 6, 4, 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 3, 2, True, True),
    "wide": (1, 34, 3, 4, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),  # several channel blocks
    # more output channels than one block of the interpreter's kernels (16): several output blocks in the
    # forward, grad_out read block by block in the data gradient; offset groups of 16 and 4 channels
    "wide_out": (2, 20, 4, 5, 21, (3, 3), (1, 1), (1, 1), (1, 1), 1, 5, True, True),
    # offset groups meeting unequal numbers of weight groups (channels 0-3 | 4-7 | 8-11 over groups 0-5 |
    # 6-11): the first and last offset groups have an empty second segment, the last one's past the last
    # weight group
    "uneven_segments": (2, 12, 4, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2, 3, True, True),
}


def make_problem(case, dtype=torch.float64, device="cpu", offset_scale=2.0):
    B, C, H, W, Cout, (kh, kw), stride, padding, dilation, groups, G, has_mask, has_bias = CASES[case]
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    offset = torch.randn(B, 2 * G * kh * kw, Ho, Wo, dtype=torch.float64) * offset_scale
    mask = torch.rand(B, G * kh * kw, Ho, Wo, dtype=torch.float64) if has_mask else None
    weight = torch.randn(Cout, C // groups, kh, kw, dtype=torch.float64) / math.sqrt(C // groups * kh * kw)
    bias = torch.randn(Cout, dtype=torch.float64) if has_bias else None
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    tensors = {"input": to(x), "offset": to(offset), "mask": to(mask), "weight": to(weight), "bias": to(bias)}
    return tensors, {"stride": stride, "padding": padding, "dilation": dilation}


NAMES = ("input", "offset", "mask", "weight", "bias")


def minus_one_border_problem() -> tuple[dict, dict, torch.Tensor]:
    """(t, conv, grad_out) in float64: 1 channel, 4x4, zero offsets, padding 1, so tap row 0 of output
    row 0 samples exactly y = -1 (torchvision's border rule: value 0, offset gradient one-sided into the
    image, i.e. w[0, 0, 0, 1] * x[0, 0, 0, :] for the dy of tap (0, 1) there)."""
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    w = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    t = {"input": x, "offset": torch.zeros(1, 18, 4, 4, dtype=torch.float64), "weight": w, "bias": None,
         "mask": None}
    conv = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)}
    return t, conv, torch.ones(1, 1, 4, 4, dtype=torch.float64)


def non_contiguous(t: dict) -> dict:
    """The same values as ``t`` (a :func:`make_problem` dict), every tensor in a non-contiguous layout:
    channels-last input, transposed offsets, strided mask, permuted weight, strided bias."""
    nc = {
        "input": t["input"].contiguous(memory_format=torch.channels_last),
        "offset": t["offset"].transpose(2, 3).contiguous().transpose(2, 3),
        "mask": torch.stack([t["mask"], t["mask"]], -1)[..., 0],
        "weight": t["weight"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
        "bias": torch.stack([t["bias"], t["bias"]], 1)[:, 0],
    }
    assert not any(v.is_contiguous() for v in nc.values())
    return nc


def copy_keeping_strides(t: torch.Tensor) -> torch.Tensor:
    """A copy of t with t's strides, also where they are not dense (a strided bias or mask: ``clone``
    would make those contiguous, and the kernels would never see the layout a test asks for)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def run(fn, t, conv, grad_out=None, **kw):
    """Forward and (with grad_out) backward on leaf copies of t that keep its layouts; returns
    {"out": ..., "input": grad, ...}."""
    grad = grad_out is not None
    leaves = {n: (None if v is None else copy_keeping_strides(v.detach()).requires_grad_(grad))
              for n, v in t.items()}
    out = fn(
        leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], conv["stride"], conv["padding"],
        conv["dilation"], leaves["mask"], **kw,
    )
    res = {"out": out.detach()}
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
        res.update({n: (None if v is None else v.grad) for n, v in leaves.items()})
    return res


def ref64(t, conv, grad_out=None):
    t64 = {n: (None if v is None else v.detach().cpu().double()) for n, v in t.items()}
    return run(reference_deform_conv2d, t64, conv, None if grad_out is None else grad_out.cpu())


def reduction(t):
    w = t["weight"]
    return w.shape[1] * w.shape[2] * w.shape[3]


def integer_and_border_offsets(t, conv, H, W):
    """Offsets putting sample points exactly on integers, on the borders (-1, 0, H-1, H) and far away."""
    off = t["offset"]
    values = [0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 1e6, -1e6, float(H), -float(W)]
    choices = torch.tensor(values, dtype=off.dtype)
    idx = torch.randint(len(choices), off.shape)
    return choices[idx]
