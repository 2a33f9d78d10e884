"""The CPU kernels of CFE-PatchMatch (kernels/cpu_patchmatch.py, numba) against the PyTorch path and the
float64 references: odd sizes, batch > 1, several references of different sizes in one call, the whole
paper schedule, fp32/fp64/fp16/bf16, non-contiguous and channels-last inputs, zero patches, thread-count
independence, the ops' registration. Outputs are poisoned before the kernels write them."""

import pytest
import torch

import amsa
from amsa.matching.schedule import feature_levels
from tests.support.references import similarity64, smooth_features
from tests.support.tolerances import assert_cosines_close, assert_matches_agree

pytestmark = pytest.mark.usefixtures("poison")


def _both(q, r, **kw):
    return amsa.cfe_patchmatch(q, r, backend="torch", **kw), amsa.cfe_patchmatch(q, r, backend="numba", **kw)


def _same(t, k, q, r, dtype=torch.float32):
    """The numba result equals the PyTorch path's: same FLOPs, positions and scores up to the near-ties of
    two differently ordered summations; scores are the cosines at the positions (float64 reference)."""
    assert_matches_agree(t, k, q, r, dtype=dtype)
    assert t.flops == k.flops and k.score.dtype == t.score.dtype
    assert_cosines_close(k.score, similarity64(q, r, k.pos), q.shape[1], dtype)


@pytest.mark.parametrize("offset_corrected", [False, True])
def test_numba_step_equals_torch_batch_odd_sizes(offset_corrected):
    q, r = torch.randn(2, 5, 13, 11), torch.randn(2, 5, 9, 14)
    t, k = _both(q, r, iters=(1, 2), seed=4, offset_corrected=offset_corrected, history=True)
    _same(t, k, q, r)
    q_levels, r_levels = feature_levels(q, 2, "q"), feature_levels(r, 2, "r")
    assert len(t.history) == len(k.history)
    for a, b in zip(t.history, k.history):
        assert_matches_agree(a, b, q_levels[a.level], r_levels[a.level])


def test_numba_paper_schedule_several_references_one_call():
    """The whole 1-1-2-6 schedule (dilations up to 2 on the finest level) on smooth features, three
    references of different sizes matched in one call per step, batch 2."""
    q = smooth_features(2, 4, 35, 33, seed=1)
    sizes = [(35, 33), (29, 26), (37, 24)]
    refs = [smooth_features(2, 4, h, w, seed=2 + i) for i, (h, w) in enumerate(sizes)]
    ts = amsa.cfe_patchmatch(q, refs, backend="torch", seed=3)
    ks = amsa.cfe_patchmatch(q, refs, backend="numba", seed=3)
    for t, k, r in zip(ts, ks, refs):
        _same(t, k, q, r)


def test_numba_float64_equals_torch_path():
    q, r = torch.randn(2, 4, 11, 12, dtype=torch.float64), torch.randn(2, 4, 10, 9, dtype=torch.float64)
    t, k = _both(q, r, iters=(2, 2), seed=1)
    _same(t, k, q, r, torch.float64)


def test_numba_non_contiguous_and_channels_last():
    q = torch.randn(1, 4, 11, 10).transpose(2, 3)
    r = torch.randn(1, 4, 9, 12).to(memory_format=torch.channels_last)
    _same(*_both(q, r, iters=(2,)), q, r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_numba_half_precision(dtype):
    q, r = torch.randn(1, 6, 9, 10).to(dtype), torch.randn(1, 6, 11, 9).to(dtype)
    _same(*_both(q, r, iters=(1,)), q, r)  # both accumulate the same rounded inputs in fp32


def test_numba_zero_patches_and_borders():
    q, r = torch.randn(1, 3, 10, 10), torch.randn(1, 3, 10, 10)
    q[..., :4, :4] = 0
    r[..., 5:, 5:] = 0
    t, k = _both(q, r, iters=(1,))
    _same(t, k, q, r)
    assert (k.score[0, :3, :3] == 0).all()


def test_numba_identical_maps_are_matched_exactly():
    q = smooth_features(1, 6, 40, 37, seed=5)
    m = amsa.cfe_patchmatch(q, q, backend="numba", iters=(1, 1, 4))
    yx = torch.stack(torch.meshgrid(torch.arange(40), torch.arange(37), indexing="ij"), -1)
    assert (m.pos[0] == yx).all(-1).double().mean() > 0.99


def test_numba_patch_score_kernel_equals_reference():
    from amsa.matching.cpu_backend import CPULevel

    q = torch.randn(2, 7, 8, 9)
    refs = [torch.randn(2, 7, 6, 11), torch.randn(2, 7, 9, 5)]
    pos = torch.stack([torch.stack([torch.randint(0, r.shape[2], (2, 8, 9)),
                                    torch.randint(0, r.shape[3], (2, 8, 9))], -1) for r in refs])
    s = CPULevel(q, refs).score_positions(pos)
    for i, r in enumerate(refs):
        assert_cosines_close(s[i], similarity64(q, r, pos[i]), 7)


def test_numba_result_does_not_depend_on_the_thread_count():
    """Each pixel's candidates are scored in the same order whatever the thread count: 1 and 2 threads
    agree bitwise."""
    q, r = smooth_features(2, 5, 30, 29, seed=7), smooth_features(2, 5, 27, 31, seed=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = amsa.cfe_patchmatch(q, r, backend="numba", iters=(1, 2))
        torch.set_num_threads(2)
        b = amsa.cfe_patchmatch(q, r, backend="numba", iters=(1, 2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.pos, b.pos) and torch.equal(a.score, b.score)


def test_numba_ops_pass_opcheck():
    from amsa.matching.cpu_backend import CPULevel
    from kernels.cpu_patchmatch import cpu_patch_score, cpu_patchmatch_step

    lv = CPULevel(torch.randn(1, 3, 6, 5), [torch.randn(1, 3, 7, 6), torch.randn(1, 3, 4, 5)])
    pos = torch.stack([torch.randint(0, 4, (2, 1, 6, 5)), torch.randint(0, 5, (2, 1, 6, 5))], -1)
    score = lv.score_positions(pos)
    args = (lv.query, lv.qnorm, lv.ref, lv.rnorm, lv.ref_meta)
    torch.library.opcheck(cpu_patch_score, (*args, pos))
    torch.library.opcheck(cpu_patchmatch_step, (*args, pos, score, 2, True))
