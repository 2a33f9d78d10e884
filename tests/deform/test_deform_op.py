"""Modulated deformable convolution (paper Eq. 6-8), the op and its PyTorch path: against an independent
float64 reference, gradcheck, the module, errors, autocast and torch.compile (the Triton kernels are
tested in tests/kernels/test_deform_conv_kernels.py)."""

import pytest
import torch

from amsa.deform import ModulatedDeformConv2d, deform_conv2d, deform_conv2d_torch
from tests.support.deform_reference import (
    CASES,
    NAMES,
    integer_and_border_offsets,
    make_problem,
    reduction,
    ref64,
    reference_deform_conv2d,
    run,
)
from tests.support.tolerances import assert_close


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
        (lambda a: a.update(input=a["input"][0]), r"input must be 4-D \[B, Cin, H, W\], got shape \(4, 5,"),
        (lambda a: a.update(mask=a["mask"].float()), r"mask is torch.float32 but input is torch.float64"),
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
