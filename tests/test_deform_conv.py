"""Modulated deformable convolution (paper Eq. 6-8): PyTorch path against an independent float64 reference,
gradcheck, Triton kernels (interpreter on CPU) against the PyTorch path, ops registration and errors."""

import math

import pytest
import torch
from conftest import HAS_CUDA, INTERPRET, TRITON_DEVICE

import kernels.deform_conv as kdc
from amsa.deform import ModulatedDeformConv2d, deform_conv2d, deform_conv2d_torch

needs_triton = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")
interpret = pytest.mark.interpret
# The Triton interpreter itself triggers a NumPy deprecation warning on every scalar index.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


# ------------------------------------------------------------------------------------ float64 reference


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
                inside = (h > -1) & (h < H) & (w > -1) & (w < W)
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


# ------------------------------------------------------------------------------------ problem builder

# (B, Cin, H, W, Cout, kernel, stride, padding, dilation, groups, offset groups, mask, bias)
CASES = {
    "3x3": (2, 4, 5, 6, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),
    "1x1": (1, 3, 4, 5, 2, (1, 1), (1, 1), (0, 0), (1, 1), 1, 1, True, True),
    "2x3_stride_dil": (2, 4, 7, 6, 4, (2, 3), (2, 1), (1, 2), (2, 1), 1, 2, True, False),
    "groups": (1, 6, 5, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2, 3, True, True),
    "offset_groups_nomask": (2, 4, 4, 5, 2, (3, 3), (1, 2), (1, 1), (1, 1), 1, 4, False, True),
    "groups_straddle": (1, 6, 4, 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 3, 2, True, True),
    "wide": (1, 34, 3, 4, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True),  # several channel blocks
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


def run(fn, t, conv, grad_out=None, **kw):
    """Forward and (with grad_out) backward; returns {"out": ..., "input": grad, ...}."""
    grad = grad_out is not None
    leaves = {n: (None if v is None else v.detach().clone().requires_grad_(grad)) for n, v in t.items()}
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


# ------------------------------------------------------------------------------------ tolerances


def assert_close(got, ref, dtype, red, name=""):
    """fp32/fp64 tolerance, atol scaled by the reduction length ``red`` (channels x taps)."""
    rtol, atol = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 2e-6)}[dtype]
    torch.testing.assert_close(got.cpu().double(), ref.cpu().double(), rtol=rtol, atol=atol * red, msg=name)


def assert_close_lowp(got, same_dtype, ref, name=""):
    """Low precision: the error against the fp64 reference may be at most 2x the PyTorch path's own
    same-dtype error (plus one ulp of the output scale for ties at tiny sizes)."""
    ref = ref.cpu().double()
    err = (got.cpu().double() - ref).abs().max().item()
    base = (same_dtype.cpu().double() - ref).abs().max().item()
    slack = torch.finfo(got.dtype).eps * ref.abs().max().item()
    assert err <= 2 * base + slack, f"{name}: error {err:.3g} > 2 x PyTorch's same-dtype error {base:.3g}"


def reduction(t):
    w = t["weight"]
    return w.shape[1] * w.shape[2] * w.shape[3]


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(kdc, "POISON_OUTPUTS", True)


# ------------------------------------------------------------------------------------ PyTorch path


@pytest.mark.parametrize("case", list(CASES))
def test_torch_path_matches_reference(case):
    t, conv = make_problem(case)
    gout = torch.randn_like(ref64(t, conv)["out"])
    got, ref = run(deform_conv2d_torch, t, conv, gout), ref64(t, conv, gout)
    for n in ("out", *NAMES):
        if ref.get(n) is None:
            assert got.get(n) is None
            continue
        assert_close(got[n], ref[n], torch.float64, reduction(t), n)


@pytest.mark.parametrize("case", ["3x3", "2x3_stride_dil", "groups_straddle", "offset_groups_nomask"])
def test_gradcheck_float64(case):
    t, conv = make_problem(case)
    names = [n for n in NAMES if t[n] is not None]
    inputs = tuple(t[n].clone().requires_grad_() for n in names)

    def fn(*args):
        a = dict(zip(names, args, strict=True))
        return deform_conv2d(
            a["input"], a["offset"], a["weight"], a.get("bias"), conv["stride"], conv["padding"],
            conv["dilation"], a.get("mask"),
        )

    # fast_mode checks random projections of the Jacobian: seconds instead of minutes per case.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


def test_gradcheck_float64_full_jacobian():
    """Full Jacobians, all five inputs, on a tiny problem with groups and offset groups."""
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    offset = torch.randn(1, 2 * 2 * 4, 5, 2, dtype=torch.float64) * 1.5
    mask = torch.rand(1, 2 * 4, 5, 2, dtype=torch.float64)
    weight = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    bias = torch.randn(2, dtype=torch.float64)
    inputs = tuple(v.requires_grad_() for v in (x, offset, mask, weight, bias))
    fn = lambda x, o, m, w, b: deform_conv2d(x, o, w, b, 1, (1, 0), 1, m)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def integer_and_border_offsets(t, conv, H, W):
    """Offsets putting sample points exactly on integers, on the borders (-1, 0, H-1, H) and far away."""
    off = t["offset"]
    values = [0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 1e6, -1e6, float(H), -float(W)]
    choices = torch.tensor(values, dtype=off.dtype)
    idx = torch.randint(len(choices), off.shape)
    return choices[idx]


def test_integer_border_and_far_points():
    t, conv = make_problem("3x3")
    H, W = t["input"].shape[2:]
    t["offset"] = integer_and_border_offsets(t, conv, H, W)
    gout = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    got, ref = run(deform_conv2d_torch, t, conv, gout), ref64(t, conv, gout)
    for n in ("out", *NAMES):
        assert_close(got[n], ref[n], torch.float64, reduction(t), n)


def test_offset_gradient_at_integer_point_uses_floor_corners():
    """torchvision's rule: at an integer sample point the offset gradient is the forward difference."""
    x = torch.arange(20, dtype=torch.float64).reshape(1, 1, 4, 5) ** 2
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    offset = torch.tensor([1.0, 2.0], dtype=torch.float64).reshape(1, 2, 1, 1).expand(1, 2, 4, 5).clone()
    offset.requires_grad_()
    out = deform_conv2d(x, offset, weight)
    out[0, 0, 1, 1].backward()  # samples (2, 3)
    g = offset.grad[0, :, 1, 1]
    assert g[0].item() == x[0, 0, 3, 3] - x[0, 0, 2, 3]
    assert g[1].item() == x[0, 0, 2, 4] - x[0, 0, 2, 3]
    assert out[0, 0, 1, 1].item() == x[0, 0, 2, 3]


def test_far_outside_gives_bias_and_zero_gradients():
    t, conv = make_problem("3x3")
    t["offset"] = torch.full_like(t["offset"], -1e9)
    gout = torch.ones(2, 3, 5, 6, dtype=torch.float64)
    got = run(deform_conv2d_torch, t, conv, gout)
    assert torch.equal(got["out"], t["bias"][None, :, None, None].expand_as(got["out"]))
    for n in ("input", "offset", "mask", "weight"):
        assert not got[n].any(), n


def test_zero_offset_is_a_convolution():
    t, conv = make_problem("2x3_stride_dil")
    t["offset"] = torch.zeros_like(t["offset"])
    t["mask"] = None
    out = run(deform_conv2d, t, conv)["out"]
    want = torch.nn.functional.conv2d(t["input"], t["weight"], t["bias"], **conv)
    assert_close(out, want, torch.float64, reduction(t))


def test_module():
    torch.manual_seed(0)
    m = ModulatedDeformConv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    off = torch.randn(2, 2 * 2 * 9, 5, 5, dtype=torch.float64)
    mask = torch.rand(2, 2 * 9, 5, 5, dtype=torch.float64)
    y = m(x, off, mask)
    want = reference_deform_conv2d(x, off, m.weight, m.bias, (1, 1), (1, 1), (1, 1), mask)
    assert_close(y, want, torch.float64, 18)
    y.sum().backward()
    assert m.weight.grad is not None and m.bias.grad is not None
    assert "kernel_size=(3, 3)" in repr(m)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(offset=a["offset"][:, :-2]), r"offset must be \[B, 2\*G\*kh\*kw, Ho, Wo\]"),
        (lambda a: a.update(offset=a["offset"][..., :-1]), r"offset must be .*= \[2, 18\*G, 5, 6\]"),
        (lambda a: a.update(mask=a["mask"][:, :-1]), r"mask must be \[B, G\*kh\*kw, Ho, Wo\] = \[2, 9, 5, 6"),
        (lambda a: a.update(bias=a["bias"][:-1]), r"bias must be \[Cout\] = \[3\]"),
        (lambda a: a.update(weight=a["weight"][:, :3]), r"weight must be \[Cout, Cin/groups, kh, kw\]"),
        (lambda a: a.update(input=a["input"][0]), r"input must be a 4-D tensor"),
        (lambda a: a.update(mask=a["mask"].float()), r"mask has dtype torch.float32"),
        (lambda a: a.update(stride=0), r"stride >= 1"),
        (lambda a: a.update(stride=(1, 2, 3)), r"stride must be an int or a pair"),
        (lambda a: a.update(backend="cuda"), r"backend must be"),
    ],
)
def test_bad_input_names_argument(change, match):
    t, conv = make_problem("3x3")
    args = {**t, **conv}
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        deform_conv2d(
            args["input"], args["offset"], args["weight"], args["bias"], args["stride"], args["padding"],
            args["dilation"], args["mask"], **({"backend": args["backend"]} if "backend" in args else {}),
        )


def test_autocast_runs_in_autocast_dtype():
    t, conv = make_problem("3x3", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(deform_conv2d, t, conv)["out"]
    assert out.dtype == torch.bfloat16
    want = run(deform_conv2d_torch, {n: v.bfloat16() for n, v in t.items()}, conv)["out"]
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_compile_fullgraph_torch_path():
    t, conv = make_problem("3x3", dtype=torch.float32)
    fn = lambda x, o, w, b, m: deform_conv2d(x, o, w, b, 1, 1, 1, m, backend="torch")
    args = (t["input"], t["offset"], t["weight"], t["bias"], t["mask"])
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    assert_close(out, fn(*args), torch.float32, reduction(t))


# ------------------------------------------------------------------------------------ Triton kernels

TRITON_CASES = ["3x3", "1x1", "2x3_stride_dil", "groups", "offset_groups_nomask", "groups_straddle", "wide"]


@needs_triton
@interpret
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_torch_fp32(case, poison):
    t, conv = make_problem(case, dtype=torch.float32, device=TRITON_DEVICE)
    gout = torch.randn_like(run(deform_conv2d_torch, t, conv)["out"])
    got = run(deform_conv2d, t, conv, gout, backend="triton")
    want = run(deform_conv2d_torch, t, conv, gout)
    for n in ("out", *NAMES):
        if want[n] is None:
            assert got[n] is None
            continue
        assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape
        assert_close(got[n], want[n], torch.float32, reduction(t), n)


@needs_triton
@interpret
def test_triton_integer_border_far_points(poison):
    t, conv = make_problem("offset_groups_nomask", dtype=torch.float32, device=TRITON_DEVICE)
    H, W = t["input"].shape[2:]
    t["offset"] = integer_and_border_offsets(t, conv, H, W).to(TRITON_DEVICE)
    t["offset"][0, :4] = float("nan")  # NaN positions sample nothing (torchvision: undefined)
    t["offset"][1, :4] = float("inf")
    gout = torch.randn(2, 2, 4, 3, device=TRITON_DEVICE)
    got = run(deform_conv2d, t, conv, gout, backend="triton")
    t["offset"][0, :4] = 1e9
    t["offset"][1, :4] = 1e9
    want = run(deform_conv2d_torch, t, conv, gout)
    for n in ("out", *NAMES):
        if want[n] is not None:
            assert_close(got[n], want[n], torch.float32, reduction(t), n)


@needs_triton
@interpret
def test_triton_non_contiguous_and_expanded_grad(poison):
    t, conv = make_problem("groups", dtype=torch.float32, device=TRITON_DEVICE)
    nc = {
        "input": t["input"].contiguous(memory_format=torch.channels_last),
        "offset": t["offset"].transpose(2, 3).contiguous().transpose(2, 3),
        "mask": torch.stack([t["mask"], t["mask"]], -1)[..., 0],
        "weight": t["weight"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
        "bias": torch.stack([t["bias"], t["bias"]], 1)[:, 0],
    }
    assert not any(v.is_contiguous() for v in nc.values())
    gout = torch.ones(1, 1, 1, 1, device=TRITON_DEVICE).expand(1, 4, 5, 4)  # stride-0 grad, as from .sum()
    got = run(deform_conv2d, nc, conv, gout, backend="triton")
    want = run(deform_conv2d_torch, t, conv, gout)
    for n in ("out", *NAMES):
        assert_close(got[n], want[n], torch.float32, reduction(t), n)


@needs_triton
@interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype, poison):
    t, conv = make_problem("offset_groups_nomask", device=TRITON_DEVICE)
    t["mask"] = torch.rand(2, 36, 4, 3, dtype=torch.float64, device=TRITON_DEVICE)
    t["input"] = t["input"] * 4
    gout = torch.randn(2, 2, 4, 3, dtype=torch.float64, device=TRITON_DEVICE)
    low = {n: v.to(dtype) for n, v in t.items()}
    got = run(deform_conv2d, low, conv, gout, backend="triton")
    same = run(deform_conv2d_torch, low, conv, gout)
    ref = ref64(low, conv, gout)  # exact result for the rounded inputs
    for n in ("out", *NAMES):
        assert got[n].dtype == dtype
        assert_close_lowp(got[n], same[n], ref[n], f"{dtype} {n}")


@needs_triton
@interpret
def test_triton_partial_gradients():
    """Only some inputs require grad: the others get none and nothing breaks."""
    t, conv = make_problem("3x3", dtype=torch.float32, device=TRITON_DEVICE)
    x, off = t["input"].clone().requires_grad_(), t["offset"].clone().requires_grad_()
    out = deform_conv2d(x, off, t["weight"], t["bias"], 1, 1, 1, t["mask"], backend="triton")
    out.sum().backward()
    x2, off2 = t["input"].clone().requires_grad_(), t["offset"].clone().requires_grad_()
    deform_conv2d_torch(x2, off2, t["weight"], t["bias"], 1, 1, 1, t["mask"]).sum().backward()
    assert_close(x.grad, x2.grad, torch.float32, 36)
    assert_close(off.grad, off2.grad, torch.float32, 36)


def _op_args(device, requires_grad):
    t, conv = make_problem("groups_straddle", dtype=torch.float32, device=device)
    g = lambda v: v.clone().requires_grad_(requires_grad)
    tensors = (g(t["input"]), g(t["offset"]), g(t["mask"]), g(t["weight"]), g(t["bias"]))
    return t, conv, (*tensors, 1, 1, 1, 1, 1, 1)


@needs_triton
@interpret
def test_opcheck_forward():
    _, _, args = _op_args(TRITON_DEVICE, True)
    torch.library.opcheck(torch.ops.amsa.deform_conv2d_fwd.default, args)
    args_nomask = (*args[:2], None, args[3], None, *args[5:])
    torch.library.opcheck(torch.ops.amsa.deform_conv2d_fwd.default, args_nomask, test_utils="test_schema")


@needs_triton
@interpret
def test_opcheck_backward():
    t, _, args = _op_args(TRITON_DEVICE, False)
    gout = torch.randn(1, 6, 4, 4, device=TRITON_DEVICE)
    x, offset, mask, weight = args[:4]
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for bwd_args in (
        (gout, x, offset, mask, weight, *args[5:], 1, 1, 1),
        (gout, x, offset, None, weight, *args[5:], 0, 1, 0),  # no mask, only grad_offset requested
    ):
        torch.library.opcheck(torch.ops.amsa.deform_conv2d_bwd.default, bwd_args, test_utils=utils)


@needs_triton
@interpret
def test_compile_fullgraph_triton_op():
    _, _, args = _op_args(TRITON_DEVICE, False)
    fn = lambda x, o, m, w, b: deform_conv2d(x, o, w, b, 1, 1, 1, m, backend="triton")
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args[:5])
    assert_close(out, fn(*args[:5]), torch.float32, 18)


# ------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 8])
def test_gpu_amsa_shape(dtype, G):
    """An AMSA-sized problem (64 channels at 40x40, 3x3, offset groups 1 and 8) on CUDA, fwd + bwd."""
    B, C, H, W = 2, 64, 40, 40
    dev = "cuda"
    x = torch.randn(B, C, H, W, device=dev, dtype=torch.float64)
    t = {
        "input": x,
        "offset": torch.randn(B, 2 * G * 9, H, W, device=dev, dtype=torch.float64) * 3,
        "mask": torch.rand(B, G * 9, H, W, device=dev, dtype=torch.float64),
        "weight": torch.randn(C, C, 3, 3, device=dev, dtype=torch.float64) / 24,
        "bias": torch.randn(C, device=dev, dtype=torch.float64),
    }
    conv = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)}
    gout = torch.randn(B, C, H, W, device=dev, dtype=torch.float64)
    low = {n: v.to(dtype) for n, v in t.items()}
    got = run(deform_conv2d, low, conv, gout)
    same = run(deform_conv2d_torch, low, conv, gout)
    ref = run(deform_conv2d_torch, {n: v.to(dtype).double() for n, v in t.items()}, conv, gout)
    for n in ("out", *NAMES):
        if dtype == torch.float32:
            assert_close(got[n], ref[n], torch.float32, C * 9, n)
        else:
            assert_close_lowp(got[n], same[n], ref[n], f"{dtype} {n}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_matches_torchvision():
    tvops = pytest.importorskip("torchvision.ops")
    for case in TRITON_CASES:
        t, conv = make_problem(case, dtype=torch.float32, device="cuda")
        gout = torch.randn_like(run(deform_conv2d_torch, t, conv)["out"])
        got = run(deform_conv2d, t, conv, gout)
        want = run(tvops.deform_conv2d, t, conv, gout)
        for n in ("out", *NAMES):
            if want[n] is not None:
                assert_close(got[n], want[n], torch.float32, reduction(t), f"{case} {n}")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_beyond_int32_indexing():
    """Input with more than 2**31 elements (about 11 GB of GPU memory in all): the last pixels are right."""
    H = W = 33000
    x = torch.randn(1, 2, H, W, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    offset = torch.zeros(1, 2, H, W, device="cuda", dtype=torch.float16)
    offset[0, 1, -1, -2] = 0.5  # last row: halfway between the last two pixels
    weight = torch.tensor([1.0, -2.0], device="cuda", dtype=torch.float16).reshape(1, 2, 1, 1)
    out = deform_conv2d(x, offset, weight)
    want = x[0, 0, -1, -4:].float() - 2 * x[0, 1, -1, -4:].float()
    want[-2] = (x[0, 0, -1, -2:].float().mean() - 2 * x[0, 1, -1, -2:].float().mean())
    torch.testing.assert_close(out[0, 0, -1, -4:].float(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_compile_fullgraph():
    _, _, args = _op_args("cuda", True)
    fn = lambda x, o, m, w, b: deform_conv2d(x, o, w, b, 1, 1, 1, m)
    out = torch.compile(fn, fullgraph=True)(*args[:5])
    out.sum().backward()
    assert_close(out, fn(*args[:5]), torch.float32, 18)


# ------------------------------------------------------------------------------- compiled (no GPU needed)

_COMPILE_SCRIPT = r"""
import kernels.deform_conv as k
from sm90 import compile_for_sm90


def run(kernel, dtype, constexprs, num_warps):
    wide = ("gx_ptr", "gw_ptr")
    types = lambda name: "*" + ("fp32" if name in wide else dtype) if name.endswith("_ptr") else "i32"
    compile_for_sm90(kernel, types, constexprs, num_warps)


for dtype in ("fp32", "fp16", "bf16"):
    cfg = k._fwd_configs()[-1]
    run(k._deform_conv_fwd_kernel, dtype, dict(KH=3, KW=3, HAS_MASK=1, HAS_BIAS=1, **cfg.kwargs),
                     cfg.num_warps)
    run(k._deform_conv_bwd_data_kernel, dtype, dict(KH=3, KW=3, HAS_MASK=1, NEED_GRAD_INPUT=1,
                     BLOCK_P=64, BLOCK_N=64, BLOCK_C=16 if dtype == "fp32" else 32), 8)
    run(k._deform_conv_bwd_weight_kernel, dtype, dict(KH=3, KW=3, HAS_MASK=1, BLOCK_P=64,
                     BLOCK_N=64, BLOCK_C=32), 8)
run(k._deform_conv_fwd_kernel, "fp16", dict(KH=1, KW=2, HAS_MASK=0, HAS_BIAS=0, BLOCK_P=64,
                 BLOCK_N=64, BLOCK_C=16), 4)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter accepts code that the compiler rejects: compile every kernel for an H100/H200
    (sm_90) ahead of time with the ptxas bundled in the Triton wheel. No GPU needed."""
    from sm90 import run_script

    pytest.importorskip("triton.backends.nvidia")
    proc = run_script(_COMPILE_SCRIPT)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
