"""The CPU kernels of the deformable convolution (kernels/cpu_deform.py, numba) against the PyTorch path and
the float64 reference: all five gradients, torchvision's border rule (-1 included), low precision, any
layout, several column tiles per image, thread-count independence, the ops' registration (their float64
gradcheck is in tests/deform/test_deform_op.py). Outputs are poisoned before the kernels write them."""

import pytest
import torch

import kernels.cpu_deform as cpu_deform
from amsa.deform import deform_conv2d, deform_conv2d_torch
from tests.support.deform_reference import (
    CASES,
    NAMES,
    integer_and_border_offsets,
    make_problem,
    minus_one_border_problem,
    non_contiguous,
    reduction,
    ref64,
    run,
)
from tests.support.tolerances import assert_close, assert_close_lowp

pytestmark = pytest.mark.usefixtures("poison")


def _numba(t, conv, gout=None):
    return run(deform_conv2d, t, conv, gout, backend="numba")


def _agree(got, want, t, dtype, names=("out", *NAMES)):
    for n in names:
        if want[n] is None:
            assert got[n] is None, n
            continue
        assert got[n].dtype == dtype and got[n].shape == want[n].shape, n
        assert_close(got[n], want[n], dtype, reduction(t), n)


@pytest.mark.parametrize("case", list(CASES))
def test_numba_matches_torch_path_and_reference_fp32(case):
    t, conv = make_problem(case, dtype=torch.float32)
    gout = torch.randn_like(run(deform_conv2d_torch, t, conv)["out"])
    got = _numba(t, conv, gout)
    _agree(got, run(deform_conv2d_torch, t, conv, gout), t, torch.float32)
    _agree(got, ref64(t, conv, gout), t, torch.float32)


@pytest.mark.parametrize("case", ["3x3", "2x3_stride_dil", "groups_straddle", "offset_groups_nomask"])
def test_numba_float64_equals_reference(case):
    t, conv = make_problem(case)
    gout = torch.randn_like(ref64(t, conv)["out"])
    _agree(_numba(t, conv, gout), ref64(t, conv, gout), t, torch.float64)


def test_numba_integer_border_far_and_nan_points():
    """Sample points on integers, on -1, 0, H-1 and H, far away, NaN and Inf: NaN/Inf points sample
    nothing, like far ones (the PyTorch path, given far points instead, is the reference)."""
    t, conv = make_problem("offset_groups_nomask", dtype=torch.float32)
    H, W = t["input"].shape[2:]
    t["offset"] = integer_and_border_offsets(t, conv, H, W)
    t["offset"][0, :4] = float("nan")
    t["offset"][1, :4] = float("inf")
    gout = torch.randn(2, 2, 4, 3)
    got = _numba(t, conv, gout)
    t["offset"][:, :4] = 1e9
    _agree(got, run(deform_conv2d_torch, t, conv, gout), t, torch.float32)


def test_numba_minus_one_border_is_torchvisions():
    """Zero offsets at padding 1 put tap row 0 of output row 0 exactly on y = -1: value 0 and the offset
    gradient the one-sided derivative into the image (the PyTorch path's test checks this rule against
    forward differences), also in float32."""
    t, conv, gout = minus_one_border_problem()
    x, w = t["input"], t["weight"]
    for dtype in (torch.float64, torch.float32):
        td = {n: None if v is None else v.to(dtype) for n, v in t.items()}
        got = _numba(td, conv, gout.to(dtype))
        torch.testing.assert_close(got["offset"][0, 2, 0, :], (w[0, 0, 0, 1] * x[0, 0, 0, :]).to(dtype))
        _agree(got, run(deform_conv2d_torch, t, conv, gout), td, dtype, ("out", "input", "offset", "weight"))


def test_numba_offset_gradient_at_integer_points_equals_torch_path():
    t, conv = make_problem("2x3_stride_dil")
    t["offset"] = torch.randint(-3, 4, t["offset"].shape).double()
    t["offset"][:, ::4] = -1.0 - (torch.arange(t["offset"].shape[-1]) % 2).double()  # many on -1 and -2
    gout = torch.randn_like(ref64(t, conv)["out"])
    _agree(_numba(t, conv, gout), run(deform_conv2d_torch, t, conv, gout), t, torch.float64)


def test_numba_empty_input_with_padding_gives_bias():
    x = torch.randn(1, 2, 0, 5, requires_grad=True)
    off = torch.zeros(1, 18, 2, 7, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    out = deform_conv2d(x, off, w, b, padding=2, backend="numba")
    assert torch.equal(out, b[None, :, None, None].expand(1, 3, 2, 7))
    out.sum().backward()
    assert not off.grad.any() and not w.grad.any() and x.grad.shape == x.shape
    torch.testing.assert_close(b.grad, torch.full_like(b, 14.0))


def test_numba_far_outside_gives_bias_and_zero_gradients():
    t, conv = make_problem("3x3", dtype=torch.float32)
    t["offset"] = torch.full_like(t["offset"], -1e9)
    got = _numba(t, conv, torch.ones(2, 3, 5, 6))
    assert torch.equal(got["out"], t["bias"][None, :, None, None].expand_as(got["out"]))
    for n in ("input", "offset", "mask", "weight"):
        assert not got[n].any(), n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_numba_low_precision(dtype):
    """fp16/bf16: samples in fp32, columns rounded to the dtype and multiplied in it, as the PyTorch path;
    the error against float64 on the rounded inputs is at most 2x the PyTorch path's."""
    t, conv = make_problem("offset_groups_nomask")
    t["mask"] = torch.rand(2, 36, 4, 3, dtype=torch.float64)
    t["input"] = t["input"] * 4
    gout = torch.randn(2, 2, 4, 3, dtype=torch.float64)
    low = {n: v.to(dtype) for n, v in t.items()}
    got, same = _numba(low, conv, gout), run(deform_conv2d_torch, low, conv, gout)
    ref = ref64(low, conv, gout)
    for n in ("out", *NAMES):
        assert got[n].dtype == dtype
        assert_close_lowp(got[n], same[n], ref[n], f"{dtype} {n}")


def test_numba_non_contiguous_channels_last_and_expanded_grad():
    t, conv = make_problem("groups", dtype=torch.float32)
    nc = non_contiguous(t)
    gout = torch.ones(1, 1, 1, 1).expand(1, 4, 5, 4)  # stride-0 grad, as from .sum()
    _agree(_numba(nc, conv, gout), run(deform_conv2d_torch, t, conv, gout), t, torch.float32)


@pytest.mark.parametrize("case", ["3x3", "groups_straddle", "offset_groups_nomask", "2x3_stride_dil"])
def test_numba_channels_last_input_gives_channels_last_output(case):
    """A channels-last input (the layout AMSA runs in on CPU) gives a channels-last output, rows written by
    the per-group products in place, with the values and all gradients of the PyTorch path; a contiguous
    input gives a contiguous output. The fake kernel reports the same strides (opcheck)."""
    t, conv = make_problem(case, dtype=torch.float32)
    cl = {**t, "input": t["input"].contiguous(memory_format=torch.channels_last)}
    gout = torch.randn_like(run(deform_conv2d_torch, t, conv)["out"])
    got = _numba(cl, conv, gout)
    assert got["out"].is_contiguous(memory_format=torch.channels_last) and not got["out"].is_contiguous()
    assert _numba(t, conv)["out"].is_contiguous()
    _agree(got, run(deform_conv2d_torch, t, conv, gout), t, torch.float32)
    geometry = (*conv["stride"], *conv["padding"], *conv["dilation"])
    args = (cl["input"], t["offset"], t["mask"], t["weight"], t["bias"], *geometry)
    torch.library.opcheck(torch.ops.amsa.cpu_deform_conv2d_fwd.default, args)


def test_numba_several_column_tiles_per_image(monkeypatch):
    """Tiles of 7 positions (the last one partial) give what one tile gives: tile boundaries lose or
    repeat no position, in the forward pass and in every gradient."""
    t, conv = make_problem("2x3_stride_dil", dtype=torch.float32)
    gout = torch.randn_like(run(deform_conv2d_torch, t, conv)["out"])
    want = _numba(t, conv, gout)
    assert cpu_deform._Problem(t["input"], t["offset"], t["mask"], t["weight"], (1,) * 6).tile > 7
    monkeypatch.setattr(cpu_deform, "TILE_ELEMENTS", 7 * t["input"].shape[1] * 6)
    _agree(_numba(t, conv, gout), want, t, torch.float32)


def test_numba_kernels_do_not_depend_on_the_thread_count():
    """The numba kernels compute every element in the same order whatever the thread count (columns and
    offset/mask gradients split by position, the input-gradient scatter by channels): on the same inputs
    1 and 2 threads agree bitwise. (The op's products are BLAS calls, whose blocking may depend on the
    thread count: the op itself is checked against the references at tolerance, above.)"""
    t, conv = make_problem("wide", dtype=torch.float32)
    geometry = (*conv["stride"], *conv["padding"], *conv["dilation"])
    pr = cpu_deform._Problem(t["input"], t["offset"], t["mask"], t["weight"], geometry)
    image = pr.image(0)
    n = pr.L
    gcol = torch.randn(n, pr.groups * pr.width)
    threads = torch.get_num_threads()
    results = []
    try:
        for k in (1, 2):
            torch.set_num_threads(k)
            col = torch.full((n, pr.groups, pr.width), float("nan"))
            goff = torch.full((n, t["offset"].shape[1]), float("nan"))
            gmask = torch.full((n, t["mask"].shape[1]), float("nan"))
            gx = torch.zeros_like(image[0])
            args = (*pr.sampling(image), gcol.numpy(), 0, n)
            with cpu_deform.launch():
                cpu_deform._sample_columns(image[0].numpy(), *pr.sampling(image), 0, n,
                                           col.view(n, -1).numpy(), *pr.geometry())
                cpu_deform._offset_mask_grads(image[0].numpy(), *args, goff.numpy(), gmask.numpy(),
                                              *pr.geometry())
                cpu_deform._input_grad(gx.numpy(), *args, 8, *pr.geometry())
            results.append((col, goff, gmask, gx))
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("columns", "offset", "mask", "input"), *results):
        assert not a.isnan().any() and torch.equal(a, b), name


def test_numba_partial_gradients():
    """Only some inputs require grad: the others get none, and what is computed is right."""
    t, conv = make_problem("3x3", dtype=torch.float32)
    for wanted in (("input",), ("offset",), ("mask",), ("weight", "bias")):
        leaves = {n: v.clone().requires_grad_(n in wanted) for n, v in t.items()}
        deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], 1, 1, 1,
                      leaves["mask"], backend="numba").sum().backward()
        ref = run(deform_conv2d_torch, t, conv, torch.ones(2, 3, 5, 6))
        for n, v in leaves.items():
            if n in wanted:
                assert_close(v.grad, ref[n], torch.float32, reduction(t), n)
            else:
                assert v.grad is None, n


def test_numba_ops_pass_opcheck():
    t, conv = make_problem("groups_straddle", dtype=torch.float32)
    g = lambda v: v.clone().requires_grad_()
    args = (g(t["input"]), g(t["offset"]), g(t["mask"]), g(t["weight"]), g(t["bias"]), 1, 1, 1, 1, 1, 1)
    torch.library.opcheck(torch.ops.amsa.cpu_deform_conv2d_fwd.default, args)
    gout = torch.randn(1, 6, 4, 4)
    bwd_args = (gout, *[a.detach() for a in args[:4]], 1, 1, 1, 1, 1, 1, True, True, True)
    torch.library.opcheck(torch.ops.amsa.cpu_deform_conv2d_bwd.default, bwd_args)


def test_numba_compile_fullgraph():
    t, conv = make_problem("3x3", dtype=torch.float32)
    fn = lambda x, o, w, b, m: deform_conv2d(x, o, w, b, 1, 1, 1, m, backend="numba")
    args = (t["input"], t["offset"], t["weight"], t["bias"], t["mask"])
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    assert_close(out, deform_conv2d_torch(*args[:4], 1, 1, 1, args[4]), torch.float32, reduction(t))
