"""Modulated deformable convolution (paper Eq. 6-8), the op and its PyTorch path: against an independent
float64 reference, gradcheck (also of the CPU kernels), the module, errors, autocast and torch.compile
(the kernels are tested in tests/kernels/test_deform_conv_kernels.py and test_cpu_deform.py)."""

import pytest
import torch

from amsa.deform import ModulatedDeformConv2d, deform_conv2d, deform_conv2d_torch
from tests.support.deform_reference import (
    CASES,
    NAMES,
    integer_and_border_offsets,
    make_problem,
    minus_one_border_problem,
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


@pytest.mark.parametrize("backend", ["auto", "numba"])  # auto: the PyTorch path for float64
@pytest.mark.parametrize("case", ["3x3", "2x3_stride_dil", "groups_straddle", "offset_groups_nomask"])
def test_gradcheck_float64(case, backend):
    t, conv = make_problem(case)
    names = [n for n in NAMES if t[n] is not None]
    inputs = tuple(t[n].clone().requires_grad_() for n in names)

    def fn(*args):
        a = dict(zip(names, args, strict=True))
        return deform_conv2d(
            a["input"], a["offset"], a["weight"], a.get("bias"), conv["stride"], conv["padding"],
            conv["dilation"], a.get("mask"), backend=backend,
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


def _offset_grad_by_forward_differences(t, conv, gout, eps=1e-3):
    """d<gout, out>/d offset by one-sided (forward) differences of the float64 PyTorch path, entry by
    entry: moving an offset by +eps moves one sample point into the direction torchvision's offset
    gradient is taken in (the floor corners), and at integer points the output is linear on that side."""
    fn = lambda off: (deform_conv2d_torch(t["input"], off, t["weight"], t["bias"], conv["stride"],
                                          conv["padding"], conv["dilation"], t["mask"]) * gout).sum()
    base, off = fn(t["offset"]), t["offset"]
    grad = torch.empty_like(off)
    for i in range(off.numel()):
        moved = off.clone().view(-1)
        moved[i] += eps
        grad.view(-1)[i] = (fn(moved.view_as(off)) - base) / eps
    return grad


def test_minimal_minus_one_border_gradient_is_torchvisions():
    """Zero offsets at padding 1 put tap row 0 of output row 0 exactly on y = -1: torchvision's offset
    gradient there is the one-sided derivative into the image (value and other gradients unchanged)."""
    t, conv, gout = minus_one_border_problem()
    x, w = t["input"], t["weight"]
    got = run(deform_conv2d, t, conv, gout)
    edge = got["offset"][0, 2, 0, :]  # dy of tap (0, 1) at output row 0: samples y = -1
    assert (edge.abs() > 1e-3).all()
    # one-sided derivative into the image: d/dy [(1 - y') * 0 + y' * x[0, j]] = w[0, 0, 0, 1] * x[0, j]
    torch.testing.assert_close(edge, w[0, 0, 0, 1] * x[0, 0, 0, :])
    assert_close(got["offset"], _offset_grad_by_forward_differences(t, conv, gout), torch.float64, 1e4)
    assert_close(got["out"], torch.nn.functional.conv2d(x, w, padding=1), torch.float64, 9)


@pytest.mark.parametrize("case", ["3x3", "2x3_stride_dil", "offset_groups_nomask"])
def test_offset_gradient_at_integer_points_equals_forward_differences(case):
    """Integer offsets put sample points on integers, on -1 and H - 1, beyond the borders and far away:
    everywhere the offset gradient is the forward difference (torchvision's rule), and the float64
    reference agrees."""
    t, conv = make_problem(case)
    H, W = t["input"].shape[2:]
    t["offset"] = torch.randint(-3, 4, t["offset"].shape).double()
    t["offset"][:, ::4] = -1.0 - (torch.arange(t["offset"].shape[-1]) % 2).double()  # many on -1 and -2
    gout = torch.randn_like(ref64(t, conv)["out"])
    got = run(deform_conv2d_torch, t, conv, gout)
    assert_close(got["offset"], _offset_grad_by_forward_differences(t, conv, gout), torch.float64, 1e4)
    assert_close(got["offset"], ref64(t, conv, gout)["offset"], torch.float64, reduction(t))


def test_gradcheck_with_exactly_integer_offsets():
    """At integer offsets (-1 borders included) the op is differentiable in input, mask, weight and bias
    (linear in each); gradcheck them with the offsets held fixed."""
    t, conv = make_problem("3x3")
    off = torch.randint(-2, 3, t["offset"].shape).double()
    names = ("input", "mask", "weight", "bias")
    inputs = tuple(t[n].clone().requires_grad_() for n in names)
    fn = lambda x, m, w, b: deform_conv2d(x, off, w, b, conv["stride"], conv["padding"], conv["dilation"], m)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_empty_input_with_padding_gives_bias():
    """H = 0 with padding 2: the output is 2 rows of bias, as torchvision gives; gradients are zeros."""
    x = torch.randn(1, 2, 0, 5, dtype=torch.float64, requires_grad=True)
    off = torch.zeros(1, 18, 2, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = deform_conv2d(x, off, w, b, padding=2, backend="torch")
    assert out.shape == (1, 3, 2, 7)
    assert torch.equal(out, b[None, :, None, None].expand_as(out))
    out.sum().backward()
    assert not off.grad.any() and not w.grad.any() and x.grad.shape == x.shape
    torch.testing.assert_close(b.grad, torch.full_like(b, 14.0))


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
        (lambda a: a.update(input=a["input"][:, :0]), r"input must have Cin > 0 channels, got \[2, 0, 5,"),
        (lambda a: a.update(weight=a["weight"][:, :, :0]), r"weight must have kh, kw >= 1, got \[3, 4, 0, 3"),
        (lambda a: a.update(weight=a["weight"][..., :0]), r"weight must have kh, kw >= 1, got \[3, 4, 3, 0"),
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
    """Under autocast the op casts every operand to the autocast dtype: the PyTorch path then gives what it
    gives for bf16 operands, bitwise (the same backend on the same shapes)."""
    t, conv = make_problem("3x3", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(deform_conv2d, t, conv, backend="torch")["out"]
    assert out.dtype == torch.bfloat16
    want = run(deform_conv2d_torch, {n: v.bfloat16() for n, v in t.items()}, conv)["out"]
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_compile_fullgraph_torch_path():
    t, conv = make_problem("3x3", dtype=torch.float32)
    fn = lambda x, o, w, b, m: deform_conv2d(x, o, w, b, 1, 1, 1, m, backend="torch")
    args = (t["input"], t["offset"], t["weight"], t["bias"], t["mask"])
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    assert_close(out, fn(*args), torch.float32, reduction(t))
