"""CFE-PatchMatch and enumerated matching: correctness against float64 references, algorithm properties,
determinism and input validation (PyTorch path; the Triton kernels are in test_patchmatch_triton.py)."""

import pytest
import torch
import torch.nn.functional as F

import amsa
from amsa.matching.schedule import dilations
from tests.support.references import cosine_matrix64, similarity64, smooth_features
from tests.support.tolerances import assert_cosines_close, assert_matches_agree, cosine_atol


def test_enumerated_is_exact_argmax_of_float64_reference():
    q, r = torch.randn(2, 3, 7, 6), torch.randn(2, 3, 5, 8)
    r[1, :, 2:5, 0:3] = 0  # an all-zero reference patch (centre (3, 1)) scores 0
    e = amsa.enumerated_match(q, r)
    S = cosine_matrix64(q, r)
    best, arg = S.max(-1)
    assert e.pos.dtype == torch.int64 and e.pos.shape == (2, 7, 6, 2)
    assert e.score.dtype == torch.float32 and e.score.shape == (2, 7, 6)
    assert_cosines_close(e.score, best.view(2, 7, 6), 3)
    # Positions: exact wherever the float64 optimum beats the runner-up by more than rounding.
    top2 = S.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1] > cosine_atol(torch.float32, 3)).view(2, 7, 6)
    want = torch.stack([arg // 8, arg % 8], -1).view(2, 7, 6, 2)
    assert clear.float().mean() > 0.9
    assert (e.pos == want).all(-1)[clear].all()
    assert e.flops == 2 * 9 * 3 * 2 * 42 * 40


def test_enumerated_chunking_does_not_change_result():
    """Chunks change the matmul shapes, so the rounding of scores (BLAS blocking differs by CPU): the
    results agree up to near-ties, not bitwise."""
    q, r = torch.randn(1, 4, 9, 11), torch.randn(1, 4, 10, 7)
    a, b = amsa.enumerated_match(q, r), amsa.enumerated_match(q, r, chunk=5)
    assert_matches_agree(a, b, q, r)


def test_zero_patches_score_zero():
    q, r = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    q[..., :5, :5] = 0  # query pixels (0..3, 0..3) have all-zero patches
    e = amsa.enumerated_match(q, r)
    assert (e.score[0, :4, :4] == 0).all()
    m = amsa.cfe_patchmatch(q, r, iters=(1, 1))
    assert (m.score[0, :4, :4] == 0).all()


def test_enumerated_bf16_rescored_agrees_with_fp32():
    q, r = smooth_features(2, 16, 20, 18, seed=19), smooth_features(2, 16, 17, 21, seed=20)
    e32 = amsa.enumerated_match(q, r)
    e16 = amsa.enumerated_match(q, r, precision="bf16", chunk=50)
    # Winners are re-scored in fp32: scores are true similarities, never above the optimum.
    assert_cosines_close(e16.score, similarity64(q, r, e16.pos), 16)
    assert (e16.score <= e32.score + cosine_atol(torch.float32, 16)).all()
    assert (e16.pos == e32.pos).all(-1).float().mean() > 0.99
    assert e16.flops == e32.flops
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'"):
        amsa.enumerated_match(q, r, precision="tf16")


@pytest.mark.parametrize("offset_corrected", [False, True])
@pytest.mark.parametrize("iters", [(1, 1, 2, 6), (1, 1, 1, 4), (3,)])
def test_patchmatch_scores_are_true_similarities_and_bounded_by_enumerated(iters, offset_corrected):
    q = smooth_features(2, 5, 29, 27, seed=1)
    r = smooth_features(2, 5, 31, 26, seed=2)
    m = amsa.cfe_patchmatch(q, r, iters=iters, seed=3, offset_corrected=offset_corrected)
    e = amsa.enumerated_match(q, r)
    assert m.pos.dtype == torch.int64 and m.pos.shape == (2, 29, 27, 2)
    assert (m.pos[..., 0] >= 0).all() and (m.pos[..., 0] < 31).all()
    assert (m.pos[..., 1] >= 0).all() and (m.pos[..., 1] < 26).all()
    assert_cosines_close(m.score, similarity64(q, r, m.pos), 5)
    assert (m.score <= e.score + cosine_atol(torch.float32, 5)).all()
    assert (m.score >= -1).all() and (m.score <= 1).all()
    assert m.score.mean() > 0.75 * e.score.mean()  # far above a random match (mean score ~0)


def test_identical_inputs_are_recovered_exactly():
    x = smooth_features(2, 8, 40, 36, seed=4)
    m = amsa.cfe_patchmatch(x, x, seed=0)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(36), indexing="ij")
    ident = torch.stack([yy, xx], -1).expand(2, -1, -1, -1)
    assert torch.equal(m.pos, ident)
    assert_cosines_close(m.score, torch.ones_like(m.score), 8)


@pytest.mark.parametrize("offset_corrected", [False, True])
def test_translated_inputs_are_recovered_exactly(offset_corrected):
    big = smooth_features(1, 8, 64, 64, seed=5, cells=8)
    q, r = big[..., 10:50, 12:52], big[..., 4:60, 2:58]  # q pixel (y, x) is r pixel (y + 6, x + 10)
    m = amsa.cfe_patchmatch(q, r, seed=1, offset_corrected=offset_corrected)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    inner = m.pos[0, 1:-1, 1:-1]  # border query patches see zero padding that the ref does not have
    assert torch.equal(inner[..., 0], (yy + 6)[1:-1, 1:-1])
    assert torch.equal(inner[..., 1], (xx + 10)[1:-1, 1:-1])


def test_determinism_and_seed():
    q, r = torch.randn(1, 4, 24, 24), torch.randn(1, 4, 24, 24)
    a = amsa.cfe_patchmatch(q, r, iters=(1, 1), seed=7, history=True)
    b = amsa.cfe_patchmatch(q, r, iters=(1, 1), seed=7, history=True)
    c = amsa.cfe_patchmatch(q, r, iters=(1, 1), seed=8, history=True)
    assert torch.equal(a.pos, b.pos) and torch.equal(a.score, b.score)
    assert not torch.equal(a.history[0].pos, c.history[0].pos)


def test_batch_and_reference_list_equal_one_at_a_time():
    q = smooth_features(3, 4, 26, 25, seed=6)
    r1, r2 = smooth_features(3, 4, 30, 22, seed=7), smooth_features(3, 4, 24, 24, seed=8)
    both = amsa.cfe_patchmatch(q, [r1, r2], iters=(1, 2), seed=2)
    assert isinstance(both, list) and len(both) == 2
    for i, r in enumerate((r1, r2)):
        for b in range(3):
            one = amsa.cfe_patchmatch(q[b : b + 1], r[b : b + 1], iters=(1, 2), seed=2)
            part = amsa.Match(both[i].pos[b : b + 1], both[i].score[b : b + 1])
            assert_matches_agree(part, one, q[b : b + 1], r[b : b + 1])


def test_history_scores_never_decrease_within_a_level():
    q, r = smooth_features(2, 4, 48, 40, seed=9), smooth_features(2, 4, 44, 50, seed=10)
    m = amsa.cfe_patchmatch(q, r, iters=(1, 1, 2, 3), history=True)
    assert [(s.level, s.iteration) for s in m.history] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (3, 3)]
    for prev, cur in zip(m.history, m.history[1:]):
        assert cur.flops > prev.flops
        if cur.level == prev.level:
            assert (cur.score >= prev.score).all()  # the own match is always a candidate
    last = m.history[-1]
    assert torch.equal(last.pos, m.pos) and last.flops == m.flops
    assert m.history[0].pos.shape == (2, 6, 5, 2) and m.history[0].ref_size == (5, 6)


def test_init_replaces_random_start_and_single_level():
    q, r = smooth_features(1, 4, 20, 20, seed=11), smooth_features(1, 4, 20, 20, seed=12)
    e = amsa.enumerated_match(q, r)
    m = amsa.cfe_patchmatch(q, r, iters=(0,), init=e.pos, history=True)
    assert torch.equal(m.pos, e.pos) and torch.equal(m.history[0].pos, e.pos)
    # Starting from the optimum, propagation keeps it (nothing can be strictly better, up to near-ties).
    m2 = amsa.cfe_patchmatch(q, r, iters=(2,), init=e.pos)
    assert_matches_agree(m2, e, q, r)


def test_upsample_positions_keeps_exact_2x_translation():
    h, w = 5, 7
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([yy + 1, xx + 2], -1)[None]  # coarse translation (1, 2)
    up = amsa.upsample_positions(pos, (8, 10), (16, 20), (10, 14))
    YY, XX = torch.meshgrid(torch.arange(10), torch.arange(14), indexing="ij")
    assert torch.equal(up[0], torch.stack([YY + 2, XX + 4], -1))


def test_dilation_rule():
    assert dilations((8, 8)) == [1]
    assert dilations((32, 40)) == [1, 2]
    assert dilations((250, 250)) == [1, 2, 4, 8]  # log2(250 / 8) = 4.97
    assert dilations((256, 256)) == [1, 2, 4, 8, 16]
    assert dilations((3, 100)) == [1]


def test_explicit_pyramid_and_module():
    q = smooth_features(1, 4, 32, 32, seed=13)
    r = smooth_features(1, 4, 32, 32, seed=14)
    qp = amsa.Pyramid([q[..., ::2, ::2], q])
    rp = amsa.Pyramid([r[..., ::2, ::2], r])
    m = amsa.cfe_patchmatch(qp, rp, iters=(1, 1))
    assert_cosines_close(m.score, similarity64(q, r, m.pos), 4)
    mod = amsa.CFEPatchMatch(iters=(1, 1), seed=0)
    assert torch.equal(mod(q, r).pos, amsa.cfe_patchmatch(q, r, iters=(1, 1)).pos)
    assert "iters=(1, 1)" in repr(mod)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_match_their_fp32_upcast(dtype):
    """Half-precision levels are widened and matched in fp32: the same computation as on their fp32
    upcast, so the same positions. The levels are given as a Pyramid, since a coarse level built from a
    half map is pooled in its dtype (and would differ from one pooled from the fp32 upcast)."""
    q, r = torch.randn(2, 6, 17, 15).to(dtype), torch.randn(2, 6, 16, 19).to(dtype)
    half = lambda x: [F.interpolate(x, scale_factor=0.5, mode="area"), x]
    m = amsa.cfe_patchmatch(amsa.Pyramid(half(q)), amsa.Pyramid(half(r)), iters=(1, 2))
    m32 = amsa.cfe_patchmatch(amsa.Pyramid([v.float() for v in half(q)]),
                              amsa.Pyramid([v.float() for v in half(r)]), iters=(1, 2))
    assert torch.equal(m.pos, m32.pos)
    assert m.score.dtype == torch.float32


def test_non_contiguous_and_channels_last_inputs():
    q = torch.randn(2, 5, 21, 18).transpose(2, 3)  # [2, 5, 18, 21], non-contiguous
    r = torch.randn(2, 5, 20, 23).to(memory_format=torch.channels_last)
    a = amsa.cfe_patchmatch(q, r, iters=(1, 1))
    b = amsa.cfe_patchmatch(q.contiguous(), r.contiguous(), iters=(1, 1))
    assert_matches_agree(a, b, q, r)  # reduction order may differ


def test_patch_similarity_matches_reference_and_is_differentiable():
    q = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 7, 10, dtype=torch.float64, requires_grad=True)
    pos = torch.stack([torch.randint(0, 7, (2, 9, 8)), torch.randint(0, 10, (2, 9, 8))], -1)
    s = amsa.patch_similarity(q.float(), r.float(), pos)
    assert_cosines_close(s, similarity64(q.detach(), r.detach(), pos), 3)
    torch.autograd.gradcheck(lambda a, b: amsa.patch_similarity(a, b, pos), (q, r))


# ---------------------------------------------------------------------------------------------- bad input


def _err(exc, match, fn, *a, **k):
    with pytest.raises(exc, match=match):
        fn(*a, **k)


def test_bad_inputs_raise_clear_errors():
    q, r = torch.randn(1, 4, 32, 32), torch.randn(1, 4, 32, 32)
    pm = amsa.cfe_patchmatch
    _err(TypeError, "query must be a torch.Tensor", pm, q.numpy(), r)
    _err(ValueError, r"query must be 4-D", pm, q[0], r)
    _err(ValueError, r"ref must be 4-D", pm, q, r[0, 0])
    _err(ValueError, "ref has batch 2 but query has batch 1", pm, q, torch.randn(2, 4, 32, 32))
    _err(ValueError, "ref has 3 channels but query has 4", pm, q, torch.randn(1, 3, 32, 32))
    _err(TypeError, "ref is torch.float16 but query is torch.float32", pm, q, r.half())
    _err(TypeError, "query must be float32, float16 or bfloat16", pm, q.long(), r.long())
    _err(ValueError, "at least 3x3", pm, torch.randn(1, 4, 2, 9), torch.randn(1, 4, 2, 9), iters=(1,))
    _err(ValueError, r"too small for 4 levels.*at least 24x24", pm, q[..., :20, :], r)
    _err(ValueError, r"ref\[1\] is 32x16, too small for 4 levels", pm, q, [r, r[..., :16]])
    _err(ValueError, "iters must not be empty", pm, q, r, iters=())
    _err(ValueError, "non-negative ints", pm, q, r, iters=(1, -1))
    _err(ValueError, "non-negative ints", pm, q, r, iters=(1, 1.5))
    _err(TypeError, "iters must be a sequence", pm, q, r, iters=3)
    _err(ValueError, "backend must be", pm, q, r, backend="cuda")
    _err(ValueError, "ref is an empty list", pm, q, [])
    bad = q.clone()
    bad[0, 1, 3, 4] = float("nan")
    _err(ValueError, "query contains NaN or Inf", pm, bad, r)
    bad = r.clone()
    bad[0, 0, 0, 0] = float("inf")
    _err(ValueError, "ref contains NaN or Inf", pm, q, bad)
    _err(ValueError, "ref contains NaN or Inf", amsa.enumerated_match, q, bad)
    _err(ValueError, r"init must have shape \[B, Hq, Wq, 2\] = \[1, 4, 4, 2\]", pm, q, r,
         init=torch.zeros(1, 8, 8, 2, dtype=torch.long))
    _err(TypeError, "init must be an integer tensor", pm, q, r, init=torch.zeros(1, 4, 4, 2))
    _err(ValueError, "outside the reference grid", pm, q, r, init=torch.full((1, 4, 4, 2), 4))
    _err(ValueError, "Pyramid of 2 levels but iters has 4", pm, amsa.Pyramid([q, q]), r)
    _err(ValueError, r"pos must have shape", amsa.patch_similarity, q, r, torch.zeros(1, 3, 3, 2).long())


def test_device_mismatch_is_reported():
    q = torch.randn(1, 4, 32, 32)
    with pytest.raises(ValueError, match="ref is on meta but query is on cpu"):
        amsa.cfe_patchmatch(q, torch.empty(1, 4, 32, 32, device="meta"))


def test_tiny_feature_magnitudes_still_give_cosines():
    q, r = torch.randn(1, 3, 9, 8) * 1e-17, torch.randn(1, 3, 8, 9) * 1e-17  # patch norms^2 ~ 1e-33
    m = amsa.cfe_patchmatch(q, r, iters=(2,))
    assert_cosines_close(m.score, similarity64(q, r, m.pos), 3)
    e = amsa.enumerated_match(q, r)
    assert_cosines_close(e.score, cosine_matrix64(q, r).max(-1).values.view(1, 9, 8), 3)


def test_torch_compile_fullgraph_traces_the_matcher():
    q, r = smooth_features(1, 4, 24, 24, seed=15), smooth_features(1, 4, 24, 20, seed=16)
    f = torch.compile(lambda a, b: amsa.cfe_patchmatch(a, [b, b[..., :18]], iters=(1, 1))[1],
                      fullgraph=True, backend="aot_eager")
    assert_matches_agree(f(q, r), amsa.cfe_patchmatch(q, r[..., :18], iters=(1, 1)), q, r[..., :18])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton path compiles only on CUDA")
def test_torch_compile_fullgraph_traces_the_triton_path_on_cuda():
    q = smooth_features(2, 16, 64, 64, seed=17).cuda()
    r = smooth_features(2, 16, 64, 72, seed=18).cuda()
    f = torch.compile(lambda a, b: amsa.cfe_patchmatch(a, b), fullgraph=True)
    assert_matches_agree(f(q, r), amsa.cfe_patchmatch(q, r), q, r)  # inductor may reorder the norms
