"""The fused matmul-argmax kernel (kernels/enumerated.py) against float64 argmaxes of the same rounded
rows: on CUDA when present, else on CPU under TRITON_INTERPRET=1 (set in conftest.py) at tiny shapes,
where the tiles are 32 x 16 x 16 so that every axis spans several blocks and a partial one. Outputs are
poisoned before the kernel writes them. Plus GPU-only checks (the sm_90 compile:
tests/kernels/test_sm90_static.py)."""

import pytest
import torch
import torch.nn.functional as F

import amsa
from bench import baselines
from tests.support.devices import INTERPRET, TRITON_DEVICE
from tests.support.references import cosine_matrix64, smooth_features

pytestmark = [pytest.mark.interpret, pytest.mark.usefixtures("poison")]

EPS32 = 2.0**-24  # unit roundoff of fp32 accumulation


def _lowest_argmax(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    smax = S.max(-1).values
    cols = torch.arange(S.shape[-1]).expand_as(S)
    return smax, torch.where(S == smax[..., None], cols, S.shape[-1]).min(-1).values


def _assert_argmax(q, r, best, idx, rel_tol=None):
    """idx is the lowest float64 argmax of q @ r^T except at documented near-ties: where it differs, the
    chosen entry is within the accumulation error of the maximum, 2 * rel_tol * ||q_i|| * max_j ||r_j||
    (rel_tol = D * 2^-24 by default, fp32 accumulation of exact products); best is the float64 score at
    idx within that error."""
    q, r, best, idx = q.double().cpu(), r.double().cpu(), best.cpu(), idx.cpu()
    S = q @ r.transpose(1, 2)
    smax, j = _lowest_argmax(S)
    assert idx.dtype == torch.int64 and best.dtype == torch.float32
    assert ((idx >= 0) & (idx < r.shape[1])).all()  # also: no poison left
    tol = 2 * (rel_tol or q.shape[-1] * EPS32) * q.norm(dim=-1) * r.norm(dim=-1).max(-1, keepdim=True).values
    chosen = S.gather(2, idx[..., None])[..., 0]
    assert ((idx == j) | (smax - chosen <= tol)).all()
    assert ((best.double() - chosen).abs() <= tol).all()


def _rows(B, N, D, dtype, transposed=False):
    """Unit rows [B, N, D] rounded to dtype (a non-contiguous view if ``transposed``)."""
    if transposed:
        return F.normalize(torch.randn(B, D, N), dim=1).to(dtype).transpose(1, 2).to(TRITON_DEVICE)
    return F.normalize(torch.randn(B, N, D), dim=-1).to(dtype).to(TRITON_DEVICE)


@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True),
                                        (torch.bfloat16, False), (torch.float16, False)])
def test_argmax_batch_odd_sizes_non_contiguous(dtype, tf32):
    from amsa.matching import matmul_argmax

    q = _rows(2, 37, 45, dtype, transposed=True)  # Nq, Nr, D: no multiples of the blocks
    r = _rows(2, 53, 45, dtype)
    assert not q.is_contiguous()
    best, idx = matmul_argmax(q, r, tf32=tf32)
    assert best.shape == idx.shape == (2, 37)
    # TF32 runs on tensor cores only on a GPU (10-bit products); the interpreter multiplies exactly.
    _assert_argmax(q, r, best, idx, rel_tol=2.0**-10 if tf32 and not INTERPRET else None)


def test_several_references_one_launch():
    from amsa.matching import matmul_argmax

    q = _rows(2, 33, 27, torch.bfloat16)
    refs = [_rows(2, 53, 27, torch.bfloat16, transposed=True), _rows(2, 16, 27, torch.bfloat16),
            _rows(2, 5, 27, torch.bfloat16)]
    out = matmul_argmax(q, refs)
    assert len(out) == 3
    for r, (best, idx) in zip(refs, out):
        _assert_argmax(q, r, best, idx)
        # the same kernel on the same tiles in the same order: bitwise equal by construction
        alone = matmul_argmax(q, r.contiguous())
        assert torch.equal(alone[1], idx) and torch.equal(alone[0], best)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_ties_go_to_the_lowest_index(dtype):
    """Small integers: every product and sum is exact, so ties are exact in any summation order."""
    from amsa.matching import matmul_argmax

    D, Nr = 21, 50
    base = torch.randint(-2, 3, (2, 4, D)).float()
    r = base.gather(1, torch.randint(0, 4, (2, Nr, 1)).expand(-1, -1, D))  # 4 distinct rows, repeated
    r[:, 40] = r[:, 3]  # ties within and across reference blocks
    q = torch.randint(-2, 3, (2, 35, D)).float()
    q[:, 7] = 0  # scores all 0: index 0
    q[:, 8] = -r[:, 0] - r[:, 1]  # mostly negative scores: the masked-out columns must not win
    q, r = q.to(dtype).to(TRITON_DEVICE), r.to(dtype).to(TRITON_DEVICE)
    best, idx = matmul_argmax(q, r)
    smax, j = _lowest_argmax(q.double().cpu() @ r.double().cpu().transpose(1, 2))
    assert torch.equal(idx.cpu(), j)
    assert torch.equal(best.double().cpu(), smax)
    assert (idx[:, 7] == 0).all()


def test_bad_input_names_argument():
    from amsa.matching import matmul_argmax

    q, r = torch.randn(1, 5, 9), torch.randn(1, 6, 9)
    with pytest.raises(ValueError, match=r"q_rows must be 3-D"):
        matmul_argmax(q[0], r)
    with pytest.raises(TypeError, match=r"r_rows must be float32, float16 or bfloat16"):
        matmul_argmax(q, r.double())
    with pytest.raises(TypeError, match=r"r_rows\[1\] is torch.bfloat16 but q_rows is torch.float32"):
        matmul_argmax(q, [r, r.bfloat16()])
    with pytest.raises(ValueError, match=r"r_rows has shape \(1, 6, 8\).*row length D"):
        matmul_argmax(q, r[..., :8])
    with pytest.raises(ValueError, match=r"r_rows has shape \(2, 6, 9\).*batch B"):
        matmul_argmax(q, r.expand(2, -1, -1))
    with pytest.raises(ValueError, match=r"r_rows must have B, N and D > 0"):
        matmul_argmax(q, r[:, :0])
    with pytest.raises(ValueError, match="empty list"):
        matmul_argmax(q, [])
    with pytest.raises(ValueError, match="tf32=True applies to float32"):
        matmul_argmax(q.bfloat16(), r.bfloat16(), tf32=True)
    with pytest.raises(TypeError, match="q_rows must be a torch.Tensor"):
        matmul_argmax(q.numpy(), r)


def test_op_schema():
    from kernels.enumerated import matmul_argmax_op

    q, r = _rows(1, 5, 9, torch.float32), _rows(1, 6, 9, torch.float32)
    meta = torch.tensor([[0, 6]], device=TRITON_DEVICE)
    # The interpreter would run the kernel on fake tensors, so the fake-tensor check needs a GPU.
    checks = ("test_schema", "test_faketensor") if TRITON_DEVICE == "cuda" else ("test_schema",)
    torch.library.opcheck(matmul_argmax_op, (q, r, meta, 1, 1), test_utils=checks)


def test_baseline_equals_enumerated_match():
    """bench.baselines.matmul_argmax_fused on patch features: fp32 gives amsa.enumerated_match's argmax
    (up to fp32 near-ties of the cosine), bf16 the optimum up to bf16's rounding of the rows."""
    q = torch.randn(2, 5, 9, 7).transpose(2, 3).to(TRITON_DEVICE)  # D = 45, Nq = 63, non-contiguous
    refs = [torch.randn(2, 5, 8, 6).to(TRITON_DEVICE), torch.randn(2, 5, 3, 5).to(TRITON_DEVICE)]
    q[..., :2, :2] = 0  # zero patches score 0 everywhere
    exact = amsa.enumerated_match(q, refs)
    for precision, tol in (("fp32", 1e-5), ("bf16", 2.0**-6)):
        ms = baselines.matmul_argmax_fused(q, refs, precision=precision)
        for m, e, r in zip(ms, exact, refs):
            wr = r.shape[-1]
            S = cosine_matrix64(q.cpu(), r.cpu())
            chosen = S.gather(2, (m.pos[..., 0] * wr + m.pos[..., 1]).flatten(1).cpu()[..., None])[..., 0]
            assert (S.max(-1).values - chosen).max() <= tol
            same = (m.pos == e.pos).all(-1).flatten(1).cpu()
            assert (same | (S.max(-1).values - chosen <= tol)).all()
            if precision == "fp32":
                assert same.double().mean() > 0.95
                torch.testing.assert_close(m.score.double().flatten(1).cpu(), chosen, atol=tol, rtol=0)
            assert m.flops == 2 * 9 * 5 * 2 * (7 * 9) * r.shape[-2] * r.shape[-1]  # 3x3xC per pair, B = 2
    with pytest.raises(ValueError, match="precision"):
        baselines.matmul_argmax_fused(q, refs[0], precision="fp8")


def test_benchmark_provider_on_cuda_only():
    from bench.patchmatch import features, matchers

    names = ("matmul_argmax_fused/bf16", "matmul_argmax_fused/tf32")
    assert not set(names) & set(matchers("cpu"))
    q, refs = features("random", 12, 4, 1, 2, TRITON_DEVICE)
    exact = amsa.enumerated_match(q, refs)
    for name in names:
        m = matchers("cuda")[name]  # built without touching a GPU; run here on TRITON_DEVICE
        ms = m.run(q, refs, (1,))
        assert sum(x.flops for x in ms) == m.flops(1, 4, (12, 12), [r.shape[-2:] for r in refs], (1,))
        for a, e in zip(ms, exact):
            assert (a.pos == e.pos).all(-1).double().mean() > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="needs a GPU")
def test_gpu_agrees_with_enumerated_match_at_demo_like_shapes():
    q = smooth_features(2, 64, 48, 44, seed=1).cuda()
    refs = [smooth_features(2, 64, 40, 50, seed=2).cuda(), smooth_features(2, 64, 32, 32, seed=3).cuda()]
    exact = amsa.enumerated_match(q, refs)
    for precision, tol, agree in (("fp32", 1e-5, 0.99), ("tf32", 2e-3, 0.95), ("bf16", 1e-2, 0.9)):
        for m, e, r in zip(baselines.matmul_argmax_fused(q, refs, precision=precision), exact, refs):
            s = amsa.patch_similarity(q, r, m.pos)
            assert (e.score - s).max() <= tol  # never worse than the optimum by more than the rounding
            assert (m.pos == e.pos).all(-1).double().mean() >= agree


@pytest.mark.gpu
@pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="needs > 5 GB on a GPU")
def test_gpu_offsets_beyond_2_pow_31_elements():
    from amsa.matching import matmul_argmax

    Nr, D = 1_000_000, 2304  # 2.3e9 elements: the last rows lie beyond 2^31
    r = torch.randn(1, Nr, D, device="cuda", dtype=torch.bfloat16)
    q = F.normalize(torch.randn(1, 64, D, device="cuda"), dim=-1).bfloat16()
    r[0, -1] = q[0, 0] * 100  # far above every random row's product with q[0, 0]
    best, idx = matmul_argmax(q, r)
    assert idx[0, 0].item() == Nr - 1
    torch.testing.assert_close(best[0, 0].item(), (q[0, 0].float() @ r[0, -1].float()).item(), rtol=1e-5,
                               atol=0)
