"""The deformable-convolution kernels (kernels/deform_conv*.py) against the PyTorch path: on CUDA when
present, else on CPU under TRITON_INTERPRET=1 at tiny shapes, outputs poisoned before the kernels write
them; the ops' registration (opcheck, torch.compile), GPU-only checks. The sm_90 compile:
tests/kernels/test_sm90_static.py."""

import pytest
import torch

from amsa.deform import deform_conv2d, deform_conv2d_torch
from tests.support.deform_reference import (
    NAMES,
    integer_and_border_offsets,
    make_problem,
    non_contiguous,
    reduction,
    ref64,
    run,
)
from tests.support.devices import TRITON_DEVICE, needs_cuda, needs_triton
from tests.support.tolerances import assert_close, assert_close_lowp

interpret = pytest.mark.interpret


TRITON_CASES = ["3x3", "1x1", "2x3_stride_dil", "groups", "offset_groups_nomask", "groups_straddle", "wide",
                "wide_out", "uneven_segments"]


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
def test_triton_minus_one_border_gradient(poison):
    """Zero and integer offsets at padding 1 (the zero-initialised DCNs of Dynamic Aggregation) put whole
    tap rows and columns on -1: the kernels give torchvision's one-sided offset gradient there, as the
    float64 PyTorch path (itself checked against forward differences) does."""
    t, conv = make_problem("offset_groups_nomask", device=TRITON_DEVICE)
    t["offset"] = torch.randint(-1, 2, t["offset"].shape, device=TRITON_DEVICE).double()
    t["offset"][:, :8] = 0.0
    gout = torch.randn_like(ref64(t, conv)["out"])
    want = run(deform_conv2d_torch, t, conv, gout)
    t32 = {n: None if v is None else v.float() for n, v in t.items()}
    got = run(deform_conv2d, t32, conv, gout, backend="triton")
    assert (want["offset"][:, 0, 0].abs() > 0).any()  # the -1 row has nonzero offset gradients
    for n in ("out", *NAMES):
        if want[n] is not None:
            assert_close(got[n], want[n], torch.float32, reduction(t), n)


@needs_triton
@interpret
def test_triton_non_contiguous_and_expanded_grad(poison):
    t, conv = make_problem("groups", dtype=torch.float32, device=TRITON_DEVICE)
    nc = non_contiguous(t)
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
        (gout, x, offset, mask, weight, *args[5:], True, True, True),
        (gout, x, offset, None, weight, *args[5:], False, True, False),  # no mask, only grad_offset requested
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
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C,H,G", [(64, 40, 1), (64, 40, 8), (256, 40, 1), (256, 40, 8), (128, 80, 8),
                                   (64, 160, 8)])
def test_gpu_amsa_shape(dtype, C, H, G):
    """AMSA's problems (3x3, padding 1; 256 channels at 40x40, 128 at 80x80, 64 at 160x160, offset groups
    1 and 8) on CUDA, fwd + bwd: the launch configurations that run (autotuned tiles, packed offset groups,
    split channel blocks)."""
    B, W = 2, H
    dev = "cuda"
    x = torch.randn(B, C, H, W, device=dev, dtype=torch.float64)
    t = {
        "input": x,
        "offset": torch.randn(B, 2 * G * 9, H, W, device=dev, dtype=torch.float64) * 3,
        "mask": torch.rand(B, G * 9, H, W, device=dev, dtype=torch.float64),
        "weight": torch.randn(C, C, 3, 3, device=dev, dtype=torch.float64) / (3 * C**0.5),
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
@needs_cuda
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
@needs_cuda
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
@needs_cuda
def test_gpu_compile_fullgraph():
    _, _, args = _op_args("cuda", True)
    fn = lambda x, o, m, w, b: deform_conv2d(x, o, w, b, 1, 1, 1, m)
    out = torch.compile(fn, fullgraph=True)(*args[:5])
    out.sum().backward()
    assert_close(out, fn(*args[:5]), torch.float32, 18)
