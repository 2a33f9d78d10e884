"""The fused Triton kernels against the PyTorch path: on CUDA when present, else on CPU under
TRITON_INTERPRET=1 (set in conftest.py) at tiny shapes. Outputs are poisoned before the kernels write them."""

import pytest
import torch

import amsa
from amsa.matching.schedule import feature_levels
from tests.support.devices import TRITON_DEVICE
from tests.support.references import similarity64, smooth_features
from tests.support.tolerances import assert_cosines_close, assert_matches_agree

pytestmark = [pytest.mark.interpret, pytest.mark.usefixtures("poison")]


def _both(q, r, **kw):
    t = amsa.cfe_patchmatch(q, r, backend="torch", **kw)
    k = amsa.cfe_patchmatch(q, r, backend="triton", **kw)
    return t, k


def _same(t, k, q, r):
    """The Triton result equals the PyTorch path's: same FLOPs, and positions and scores up to the
    near-ties of two differently ordered fp32 summations."""
    assert_matches_agree(t, k, q, r)
    assert t.flops == k.flops


@pytest.mark.parametrize("offset_corrected", [False, True])
def test_triton_step_equals_torch_batch_odd_sizes(offset_corrected):
    q = torch.randn(2, 5, 13, 11, device=TRITON_DEVICE)
    r = torch.randn(2, 5, 9, 14, device=TRITON_DEVICE)
    t, k = _both(q, r, iters=(1, 2), seed=4, offset_corrected=offset_corrected, history=True)
    _same(t, k, q, r)
    q_levels, r_levels = feature_levels(q, 2, "q"), feature_levels(r, 2, "r")
    for a, b in zip(t.history, k.history):
        assert_matches_agree(a, b, q_levels[a.level], r_levels[a.level])
    assert_cosines_close(k.score, similarity64(q.cpu(), r.cpu(), k.pos.cpu()), 5)


def test_triton_multi_reference_one_launch_equals_torch():
    q = smooth_features(1, 3, 12, 13, seed=1).to(TRITON_DEVICE)
    refs = [smooth_features(1, 3, h, w, seed=2 + i).to(TRITON_DEVICE)
            for i, (h, w) in enumerate([(12, 13), (7, 9), (9, 6)])]
    ts = amsa.cfe_patchmatch(q, refs, iters=(1, 1), backend="torch")
    ks = amsa.cfe_patchmatch(q, refs, iters=(1, 1), backend="triton")
    for t, k, r in zip(ts, ks, refs):
        _same(t, k, q, r)


def test_triton_non_contiguous_and_channels_last():
    q = torch.randn(1, 4, 11, 10, device=TRITON_DEVICE).transpose(2, 3)
    r = torch.randn(1, 4, 9, 12, device=TRITON_DEVICE).to(memory_format=torch.channels_last)
    _same(*_both(q, r, iters=(2,)), q, r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    """Batch 2, two references of different sizes in one launch, odd channels (bf16 maps are read as
    int32 pairs of channels, so a reference's offset must be counted in the kernel's units)."""
    q = torch.randn(2, 7, 9, 10, device=TRITON_DEVICE).to(dtype)
    refs = [torch.randn(2, 7, 11, 9, device=TRITON_DEVICE).to(dtype),
            torch.randn(2, 7, 6, 13, device=TRITON_DEVICE).to(dtype)]
    ts = amsa.cfe_patchmatch(q, refs, iters=(1,), backend="torch")
    ks = amsa.cfe_patchmatch(q, refs, iters=(1,), backend="triton")
    for t, k, r in zip(ts, ks, refs):
        _same(t, k, q, r)  # both accumulate the same rounded inputs in fp32


def test_triton_zero_patches_and_borders():
    q = torch.randn(1, 3, 10, 10, device=TRITON_DEVICE)
    r = torch.randn(1, 3, 10, 10, device=TRITON_DEVICE)
    q[..., :4, :4] = 0
    r[..., 5:, 5:] = 0
    t, k = _both(q, r, iters=(1,))
    _same(t, k, q, r)
    assert (k.score[0, :3, :3] == 0).all()


def test_patch_score_kernel_equals_reference():
    from amsa.matching.triton_backend import TritonLevel

    q = torch.randn(2, 7, 8, 9, device=TRITON_DEVICE)
    refs = [torch.randn(2, 7, 6, 11, device=TRITON_DEVICE), torch.randn(2, 7, 9, 5, device=TRITON_DEVICE)]
    pos = torch.stack([torch.stack([torch.randint(0, r.shape[2], (2, 8, 9)),
                                    torch.randint(0, r.shape[3], (2, 8, 9))], -1) for r in refs])
    s = TritonLevel(q, refs).score_positions(pos.to(TRITON_DEVICE))
    assert not s.isnan().any()
    for i, r in enumerate(refs):
        assert_cosines_close(s[i], similarity64(q.cpu(), r.cpu(), pos[i]), 7)


def test_triton_ops_pass_opcheck():
    from amsa.matching.triton_backend import TritonLevel
    from kernels.patchmatch import patchmatch_step

    q = torch.randn(1, 3, 6, 5, device=TRITON_DEVICE)
    lv = TritonLevel(q, [torch.randn(1, 3, 7, 6, device=TRITON_DEVICE)])
    pos = torch.stack([torch.randint(0, 7, (1, 1, 6, 5)), torch.randint(0, 6, (1, 1, 6, 5))], -1)
    pos = pos.to(TRITON_DEVICE)
    score = lv.score_positions(pos)
    # The interpreter would run the kernel on fake tensors, so the fake-tensor check needs a GPU.
    checks = ("test_schema", "test_faketensor") if TRITON_DEVICE == "cuda" else ("test_schema",)
    torch.library.opcheck(patchmatch_step, (lv.query, lv.qnorm, lv.ref, lv.rnorm, lv.ref_meta, pos, score,
                                            1, 0), test_utils=checks)


@pytest.mark.gpu
@pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="needs > 4 GB of features on a GPU")
def test_triton_offsets_beyond_2_pow_31_elements():
    from amsa.matching.triton_backend import TritonLevel

    # Reference rows [2 * 1100 * 1000, 1000] fp16 = 2.2e9 elements: the last rows are beyond 2^31.
    C, h, w = 1000, 1100, 1000
    q = torch.randn(2, C, 8, 8, device="cuda", dtype=torch.float16)
    ref = torch.randn(2, C, h, w, device="cuda", dtype=torch.float16)
    assert ref.numel() > 2**31
    pos = torch.stack([torch.randint(h - 8, h, (1, 2, 8, 8)), torch.randint(w - 8, w, (1, 2, 8, 8))], -1)
    s = TritonLevel(q, [ref]).score_positions(pos.cuda())[0]
    crop = ref[..., h - 10 :, w - 10 :]  # holds every tap of those patches, and the same zero border
    want = amsa.patch_similarity(q.float(), crop.float(), (pos[0] - torch.tensor([h - 10, w - 10])).cuda())
    torch.testing.assert_close(s, want, atol=1e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_step_at_the_paper_size(dtype):
    """The entry score and one step (dilation 1, which Triton specialises, and 4) at 250x250, C = 256,
    against the PyTorch path on the same rounded features: the launch configuration that runs."""
    from amsa.matching.torch_backend import TorchLevels
    from amsa.matching.triton_backend import TritonLevel

    q = smooth_features(1, 256, 250, 250, seed=1).cuda().to(dtype)
    r = smooth_features(1, 256, 250, 250, seed=2).cuda().to(dtype)
    pos = torch.stack([torch.randint(0, 250, (1, 1, 250, 250)) for _ in range(2)], -1).cuda()
    kern, ref = TritonLevel(q, [r]), TorchLevels(q, [r])
    score = ref.score_positions(pos)
    assert_cosines_close(kern.score_positions(pos), score, 256)
    for k in (1, 4):
        a, b = kern.step(pos, score, k, False), ref.step(pos, score, k, False)
        assert_matches_agree(amsa.Match(a[0][0], a[1][0]), amsa.Match(b[0][0], b[1][0]), channels=256)
