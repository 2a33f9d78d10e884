"""Deformable gather of the Multi-Scale Dynamic Aggregation (paper section 3.2, Eq. 6-8).

Eq. 6 and Eq. 8 sample the reference features V bilinearly at ``p + p0 + p_j (+ dP_j(p))`` and weight the
samples with the kernel weights w_j: a modulated deformable convolution (DCNv2). This module holds

* :func:`deform_conv2d`: a drop-in for ``torchvision.ops.deform_conv2d`` (same signature, semantics and
  layouts) that runs the Triton kernels of ``kernels/deform_conv.py`` on CUDA tensors and the numba kernels
  of ``kernels/cpu_deform.py`` on CPU tensors (``backend=``: :mod:`amsa.backends`; float64 and a missing
  numba take :func:`deform_conv2d_torch`);
* :func:`deform_conv2d_torch`: the vectorised PyTorch implementation (the reference of both kernels;
  differentiable through PyTorch's autograd);
* :class:`ModulatedDeformConv2d`: an ``nn.Module`` holding weight and bias, taking offset and mask.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from amsa._checks import check_same, check_tensor
from amsa.backends import choose_backend

__all__ = ["ModulatedDeformConv2d", "deform_conv2d", "deform_conv2d_torch"]

Backend = Literal["auto", "triton", "numba", "torch"]
IntPair = int | tuple[int, int]


def _pair(v: IntPair, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return int(v[0]), int(v[1])
    raise TypeError(f"deform_conv2d: {name} must be an int or a pair of ints, got {v!r}")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> None:
    """Raise a clear error naming the argument and its expected shape."""
    for name, t, layout in (("input", input, "[B, Cin, H, W]"), ("offset", offset, "[B, 2*G*kh*kw, Ho, Wo]"),
                            ("weight", weight, "[Cout, Cin/groups, kh, kw]")):
        check_tensor(t, f"deform_conv2d: {name}", 4, layout)
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"deform_conv2d: need stride >= 1, dilation >= 1 and padding >= 0, got stride={stride}, "
            f"padding={padding}, dilation={dilation}"
        )
    B, C, H, W = input.shape
    Cout, c_per_g, kh, kw = weight.shape
    if C == 0:
        raise ValueError(f"deform_conv2d: input must have Cin > 0 channels, got {_shape(input)}")
    if kh == 0 or kw == 0:
        raise ValueError(f"deform_conv2d: weight must have kh, kw >= 1, got {_shape(weight)}")
    if c_per_g == 0 or C % c_per_g != 0:
        raise ValueError(
            f"deform_conv2d: weight must be [Cout, Cin/groups, kh, kw] with Cin/groups dividing Cin={C}, "
            f"got {_shape(weight)}"
        )
    groups = C // c_per_g
    if Cout % groups != 0:
        raise ValueError(
            f"deform_conv2d: weight has Cout={Cout} output channels, not divisible by groups={groups} "
            f"(= Cin {C} / weight.shape[1] {c_per_g})"
        )
    ho = (H + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (W + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(
            f"deform_conv2d: output would be empty ({ho}x{wo}) for input {H}x{W}, kernel {kh}x{kw}, "
            f"stride {stride}, padding {padding}, dilation {dilation}"
        )
    kk = kh * kw
    if offset.shape[0] != B or offset.shape[1] == 0 or offset.shape[1] % (2 * kk) != 0 or tuple(
        offset.shape[2:]
    ) != (ho, wo):
        raise ValueError(
            f"deform_conv2d: offset must be [B, 2*G*kh*kw, Ho, Wo] = [{B}, {2 * kk}*G, {ho}, {wo}] "
            f"(G = offset groups), got {_shape(offset)}"
        )
    G = offset.shape[1] // (2 * kk)
    if C % G != 0:
        raise ValueError(f"deform_conv2d: offset groups G={G} (from offset) must divide Cin={C}")
    if mask is not None and _shape(mask) != [B, G * kk, ho, wo]:
        raise ValueError(
            f"deform_conv2d: mask must be [B, G*kh*kw, Ho, Wo] = [{B}, {G * kk}, {ho}, {wo}], "
            f"got {_shape(mask)}"
        )
    if bias is not None and _shape(bias) != [Cout]:
        raise ValueError(f"deform_conv2d: bias must be [Cout] = [{Cout}], got {_shape(bias)}")
    for name, t in (("offset", offset), ("weight", weight), ("mask", mask), ("bias", bias)):
        if t is not None:
            check_same(t, f"deform_conv2d: {name}", input, "input")
    if not input.dtype.is_floating_point:
        raise TypeError(f"deform_conv2d: input must be floating point, got {input.dtype}")


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Modulated deformable convolution with exactly the semantics of ``torchvision.ops.deform_conv2d``.

    Args:
        input: [B, Cin, H, W].
        offset: [B, 2*G*kh*kw, Ho, Wo]; channel 2*(g*kh*kw + k) is dy, +1 is dx for offset group g, tap k.
        weight: [Cout, Cin/groups, kh, kw]; groups = Cin / weight.shape[1].
        bias: [Cout] or None.
        stride, padding, dilation: int or (h, w).
        mask: [B, G*kh*kw, Ho, Wo] modulation, or None (all ones).
        backend: "auto" (Triton for CUDA tensors, the numba kernels for CPU tensors, each for fp32/fp16/
            bf16; PyTorch otherwise), "triton" (CUDA, or CPU under TRITON_INTERPRET=1 for tests), "numba"
            (CPU, any float dtype) or "torch".

    Under ``torch.autocast`` all tensors are cast to the autocast dtype.

    Returns:
        [B, Cout, Ho, Wo], differentiable in input, offset, mask, weight and bias.
    """
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    dilation = _pair(dilation, "dilation")
    if isinstance(input, torch.Tensor) and torch.is_autocast_enabled(input.device.type):
        # Under autocast, run in the autocast dtype (torchvision instead upcasts to fp32).
        dt = torch.get_autocast_dtype(input.device.type)
        cast = lambda t: None if t is None else t.to(dt)
        input, offset, weight, bias, mask = (cast(t) for t in (input, offset, weight, bias, mask))
    _check(input, offset, weight, bias, mask, stride, padding, dilation)
    chosen = choose_backend(backend, input.device, input.dtype, "deform_conv2d")
    if chosen == "triton" and input.shape[0] > 0:
        from kernels.deform_conv import deform_conv2d_fwd  # imported lazily: triton is only needed here

        return deform_conv2d_fwd(input, offset, mask, weight, bias, *stride, *padding, *dilation)
    if chosen == "numba":
        from kernels.cpu_deform import cpu_deform_conv2d_fwd  # imported lazily: numba is only needed here

        return cpu_deform_conv2d_fwd(input, offset, mask, weight, bias, *stride, *padding, *dilation)
    return deform_conv2d_torch(input, offset, weight, bias, stride, padding, dilation, mask)


def _bilinear_gather(x: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of x [B, G, Cg, H, W] at points py, px [B, G, N] (torchvision's border rule).

    Returns [B, G, Cg, N]. Differentiable in x and in the points (through the fractional parts; the floor
    corners are constants, which gives torchvision's offset gradient at integer positions). A point with
    -1 <= py < H and -1 <= px < W blends its four floor corners, each corner outside the image counting
    zero; every other point samples nothing. On py = -1 (or px = -1) exactly the value is 0 either way,
    but the point's gradient is torchvision's: the one-sided derivative into the image.
    """
    B, G, Cg, H, W = x.shape
    if H * W == 0:  # an empty image samples zeros (the output is bias only), gradients stay connected
        return (x.sum() + (py + px).unsqueeze(2)) * 0 + x.new_zeros(B, G, Cg, py.shape[-1])
    inside = (py >= -1) & (py < H) & (px >= -1) & (px < W)
    py = torch.where(inside, py, torch.zeros_like(py))
    px = torch.where(inside, px, torch.zeros_like(px))
    y0 = py.detach().floor()
    x0 = px.detach().floor()
    ly, lx = py - y0, px - x0
    y0, x0 = y0.long(), x0.long()
    flat = x.reshape(B, G, Cg, H * W)
    out = None
    for dy, dx, wgt in (
        (0, 0, (1 - ly) * (1 - lx)),
        (0, 1, (1 - ly) * lx),
        (1, 0, ly * (1 - lx)),
        (1, 1, ly * lx),
    ):
        yy, xx = y0 + dy, x0 + dx
        ok = inside & (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
        idx = torch.where(ok, yy * W + xx, torch.zeros_like(yy))
        vals = flat.gather(3, idx.unsqueeze(2).expand(B, G, Cg, idx.shape[-1]))
        term = vals * (wgt * ok).unsqueeze(2)
        out = term if out is None else out + term
    return out


def deform_conv2d_torch(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vectorised PyTorch modulated deformable convolution (the reference of the kernels; float64 on CPU).

    Same arguments as :func:`deform_conv2d`, no validation. Sampling is done in fp32 for fp16/bf16 inputs
    (fp64 for fp64); the modulated columns are then rounded to the input dtype and multiplied with the
    weight in that dtype, as the Triton kernel does. Memory: it builds the [B, Cin*kh*kw, Ho*Wo] column
    tensor.
    """
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    B, C, H, W = input.shape
    Cout, c_per_g, kh, kw = weight.shape
    groups = C // c_per_g
    kk = kh * kw
    G = offset.shape[1] // (2 * kk)
    Ho, Wo = offset.shape[2], offset.shape[3]
    L = Ho * Wo
    calc = torch.float64 if input.dtype == torch.float64 else torch.float32

    dev = input.device
    base_y = torch.arange(Ho, device=dev, dtype=calc) * sh - ph
    base_x = torch.arange(Wo, device=dev, dtype=calc) * sw - pw
    tap_y = (torch.arange(kh, device=dev, dtype=calc) * dh).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=dev, dtype=calc) * dw).repeat(kh)
    grid_y = (tap_y[:, None, None] + base_y[None, :, None]).expand(kk, Ho, Wo)
    grid_x = (tap_x[:, None, None] + base_x[None, None, :]).expand(kk, Ho, Wo)
    off = offset.to(calc).reshape(B, G, kk, 2, Ho, Wo)
    py = (grid_y + off[:, :, :, 0]).reshape(B, G, kk * L)
    px = (grid_x + off[:, :, :, 1]).reshape(B, G, kk * L)

    col = _bilinear_gather(input.to(calc).reshape(B, G, C // G, H, W), py, px)  # [B, G, C/G, kk*L]
    if mask is not None:
        col = col * mask.to(calc).reshape(B, G, 1, kk * L)
    col = col.to(input.dtype).reshape(B, groups, c_per_g * kk, L)
    out = torch.matmul(weight.reshape(groups, Cout // groups, c_per_g * kk), col)  # [B, groups, Cout/g, L]
    out = out.reshape(B, Cout, Ho, Wo)
    if bias is not None:
        out = out + bias.reshape(1, Cout, 1, 1)
    return out


class ModulatedDeformConv2d(nn.Module):
    """Modulated deformable convolution (DCNv2) holding weight and bias; offset and mask are inputs.

    ``forward(input, offset, mask=None)`` with offset [B, 2*G*kh*kw, Ho, Wo] and mask [B, G*kh*kw, Ho, Wo];
    the offset groups G are inferred from the offset. Initialised as ``torchvision.ops.DeformConv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        backend: Backend = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_channels % groups != 0 or out_channels % groups != 0:
            raise ValueError(
                f"ModulatedDeformConv2d: groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}"
        )
