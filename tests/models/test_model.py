"""AMSA network: pre-offsets and Dynamic Aggregation against independent float64 formulas, the multi-scale
weights (Eq. 9), and the whole model on tiny inputs (forward/backward, batch consistency, padding, lists of
references, determinism, errors). Tiny model: ngf 8, one residual block, two matching levels."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import amsa
from amsa.matching.schedule import TAPS
from amsa.models.aggregation import DynamicAggregationConv, PreOffsetDeformConv, flow_from_positions
from tests.support.tolerances import assert_matches_agree

# Two matching levels keep the minimum reference at 4 * 3 * 2 = 24 pixels, so tests run in seconds.
TINY = dict(ngf=8, n_blocks=1, ref_scales=2, iters=(1, 1), backend="torch")


def tiny_model(**kw) -> amsa.AMSA:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights are intended here
        return amsa.AMSA(**{**TINY, **kw})


@pytest.fixture(scope="module")
def model() -> amsa.AMSA:
    torch.manual_seed(1)
    return tiny_model()


# ----------------------------------------------------------------------------------------------------------
# Pre-offsets (matches -> DCN offsets)


def reference_pre_offsets(flow: torch.Tensor, scale: int) -> torch.Tensor:
    """Loop form of offset_k(P) = scale * flow(floor(P / scale) - d_k), zero off the map."""
    B, _, h, w = flow.shape
    out = torch.zeros(B, 18, scale * h, scale * w, dtype=torch.float64)
    for k, (dy, dx) in enumerate(TAPS):
        for Y in range(scale * h):
            for X in range(scale * w):
                y, x = Y // scale - dy, X // scale - dx
                if 0 <= y < h and 0 <= x < w:
                    out[:, 2 * k, Y, X] = scale * flow[:, 0, y, x]
                    out[:, 2 * k + 1, Y, X] = scale * flow[:, 1, y, x]
    return out


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_pre_offsets_match_loop_formula(scale):
    flow = torch.randn(2, 2, 5, 7, dtype=torch.float64) * 3
    torch.testing.assert_close(amsa.pre_offsets(flow, scale), reference_pre_offsets(flow, scale))


def test_identity_matches_give_zero_flow_and_translation_gives_the_shift():
    B, h, w = 2, 6, 9
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    identity = torch.stack((ys, xs), -1).expand(B, h, w, 2)
    assert torch.equal(amsa.pre_offsets(flow_from_positions(identity), 4), torch.zeros(B, 18, 4 * h, 4 * w))
    shifted = identity + torch.tensor([2, -3])
    offsets = amsa.pre_offsets(flow_from_positions(shifted), 2)
    # Inside (where floor(P / 2) - d stays on the map) every tap's offset is 2 * (2, -3).
    assert torch.equal(offsets[:, 0::2, 2:-2, 2:-2], torch.full_like(offsets[:, 0::2, 2:-2, 2:-2], 4.0))
    assert torch.equal(offsets[:, 1::2, 2:-2, 2:-2], torch.full_like(offsets[:, 1::2, 2:-2, 2:-2], -6.0))


@pytest.mark.parametrize("scale", [1, 2])
def test_dcn_with_pre_offsets_is_the_indexed_warp(scale):
    """A DCN whose weight keeps only tap k (identity over channels) samples V at P + d_k + offset_k(P):
    integer flows make that an exact gather, computed here by indexing."""
    B, C, h, w = 2, 3, 4, 5
    H, W = scale * h, scale * w
    flow = torch.randint(-3, 4, (B, 2, h, w)).double()
    V = torch.randn(B, C, H, W, dtype=torch.float64)
    offsets = amsa.pre_offsets(flow, scale)
    for k, (dy, dx) in enumerate(TAPS):
        weight = torch.zeros(C, C, 3, 3, dtype=torch.float64)
        weight[range(C), range(C), dy + 1, dx + 1] = 1
        out = amsa.deform_conv2d(V, offsets, weight, padding=1, backend="torch")
        expected = torch.zeros_like(out)
        for b in range(B):
            for Y in range(H):
                for X in range(W):
                    y, x = Y // scale - dy, X // scale - dx
                    f = flow[b, :, y, x] * scale if 0 <= y < h and 0 <= x < w else torch.zeros(2)
                    sy, sx = Y + dy + int(f[0]), X + dx + int(f[1])
                    if 0 <= sy < H and 0 <= sx < W:
                        expected[b, :, Y, X] = V[b, :, sy, sx]
        torch.testing.assert_close(out, expected, msg=f"tap {k}")


def test_aggregation_convs_at_init_use_exactly_the_matching_offsets():
    """Zero-initialised offset/mask convs: Eq. 6 and Eq. 8 reduce to a DCN with the pre-offsets (repeated
    over the deformable groups in Eq. 8) and modulation 1/2."""
    B, C, H, W, G = 2, 16, 5, 7, 4
    V = torch.randn(B, C, H, W, dtype=torch.float64)
    feat = torch.randn(B, C, H, W, dtype=torch.float64)
    pre = torch.randn(B, 18, H, W, dtype=torch.float64)
    warp = PreOffsetDeformConv(C, C, backend="torch").double()
    half = torch.full((B, 9, H, W), 0.5, dtype=torch.float64)
    torch.testing.assert_close(warp(V, pre), amsa.deform_conv2d(V, pre, warp.weight, warp.bias, padding=1,
                                                                mask=half, backend="torch"))
    agg = DynamicAggregationConv(C, C, G, backend="torch").double()
    expected = amsa.deform_conv2d(V, pre.repeat(1, G, 1, 1), agg.weight, agg.bias, padding=1,
                                  mask=half.repeat(1, G, 1, 1), backend="torch")
    torch.testing.assert_close(agg(V, feat, pre), expected)


def test_multiscale_weights_are_a_tempered_softmax():
    scores = [torch.rand(2, 3, 5, dtype=torch.float64) * 2 - 1 for _ in range(3)]
    w = amsa.multiscale_weights(scores, temperature=0.1, scale=4)
    e = torch.stack([torch.exp(s / 0.1) for s in scores], 1)
    expected = (e / e.sum(1, keepdim=True)).repeat_interleave(4, 2).repeat_interleave(4, 3)
    torch.testing.assert_close(w, expected)
    with pytest.raises(ValueError, match="temperature"):
        amsa.multiscale_weights(scores, temperature=0.0)


# ----------------------------------------------------------------------------------------------------------
# The whole model


def test_forward_backward_gradients_reach_only_net(model):
    lr = torch.rand(2, 3, 12, 13)
    ref = torch.rand(2, 3, 32, 36)
    model.zero_grad()
    sr = model(lr, ref)
    assert sr.shape == (2, 3, 48, 52) and torch.isfinite(sr).all()
    sr.square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("net."):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert model.net.content_extractor.conv_first.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_train_mode_keeps_extractors_frozen_in_eval(model):
    model.train()
    assert model.net.training and not model.vgg.training and not model.matching_extractor.training
    model.eval()
    assert not model.net.training


def test_batch_equals_samples_one_at_a_time(model):
    lr = torch.rand(2, 3, 11, 13)
    ref = torch.rand(2, 3, 30, 41)
    with torch.no_grad():
        sr = model(lr, ref)
        matches = model.match(lr, ref)
        for b in range(2):
            one = model(lr[b:b + 1], ref[b:b + 1])
            torch.testing.assert_close(sr[b:b + 1], one, rtol=1e-4, atol=1e-5)
            for m, m1 in zip(matches, model.match(lr[b:b + 1], ref[b:b + 1])):
                # batch-2 and batch-1 convolutions round differently: equal up to near-ties
                one = amsa.Match(m.pos[b:b + 1], m.score[b:b + 1])
                assert_matches_agree(one, m1, channels=256)  # conv3_1 features


def test_odd_sizes_are_padded_and_cropped_back(model):
    """The output of an odd-sized LR is the crop of the output of the same LR padded by hand."""
    lr = torch.rand(1, 3, 9, 7)
    ref = torch.rand(1, 3, 29, 27)
    with torch.no_grad():
        sr = model(lr, ref)
        assert sr.shape == (1, 3, 36, 28)
        # Common size: LR side max(9, ceil(29 / 4) = 8, 3 * 2) = 9 -> 10 (level factor 2), 7 -> 8.
        padded = F.pad(lr, (0, 1, 0, 1), mode="replicate")
        torch.testing.assert_close(sr, model(padded, ref)[..., :36, :28], rtol=1e-4, atol=1e-5)


def test_cpu_forward_runs_channels_last_with_the_numba_kernels(model):
    """On CPU the network runs channels-last (the convolutions' native layout) and returns a contiguous
    image; the numba deformable kernels there give what the PyTorch path gives (same weights)."""
    pytest.importorskip("numba")
    fast = tiny_model(backend="numba")
    fast.load_state_dict(model.state_dict())
    seen = []
    hook = fast.net.content_extractor.conv_first.register_forward_hook(
        lambda m, args, out: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    lr, ref = torch.rand(2, 3, 10, 8), torch.rand(2, 3, 30, 34)
    with torch.no_grad():
        sr = fast(lr, ref)
        want = model(lr, ref)
    hook.remove()
    assert seen == [True] and sr.is_contiguous() and want.is_contiguous()
    torch.testing.assert_close(sr, want, rtol=1e-4, atol=1e-5)


def test_list_of_references(model):
    lr = torch.rand(1, 3, 8, 10)
    refs = [torch.rand(1, 3, 32, 40), torch.rand(1, 3, 25, 33)]
    with torch.no_grad():
        sr = model(lr, refs)
        matches = model.match(lr, refs)
        assert sr.shape == (1, 3, 32, 40)
        assert len(matches) == 2 * model.ref_scales
        assert all(m.pos.shape == (1, 8, 10, 2) and m.score.shape == (1, 8, 10) for m in matches)
        torch.testing.assert_close(model(lr, refs[:1]), model(lr, refs[0]))


def test_seeded_matching_is_deterministic():
    """Same seed: identical outputs whatever the global RNG; another seed: another random start (with
    zero iterations the start is the result, so it must differ)."""
    lr, ref = torch.rand(1, 3, 10, 12), torch.rand(1, 3, 40, 48)
    torch.manual_seed(3)
    a = tiny_model(seed=5)
    torch.manual_seed(3)
    b = tiny_model(seed=5)
    with torch.no_grad():
        torch.manual_seed(123)
        out_a = a(lr, ref)
        torch.manual_seed(999)
        assert torch.equal(out_a, b(lr, ref))
    start = tiny_model(seed=5, iters=(0, 0))
    pos5 = [m.pos for m in start.match(lr, ref)]
    assert all(torch.equal(p, m.pos) for p, m in zip(pos5, start.match(lr, ref)))
    start.seed = 6
    assert not all(torch.equal(p, m.pos) for p, m in zip(pos5, start.match(lr, ref)))


def test_profiler_ranges(model):
    lr, ref = torch.rand(1, 3, 6, 6), torch.rand(1, 3, 24, 24)
    with torch.profiler.profile() as prof, torch.no_grad():
        model(lr, ref)
    names = {e.key for e in prof.key_averages()}
    assert {"amsa.features", "amsa.matching", "amsa.aggregation", "amsa.restoration"} <= names


def test_bad_inputs_raise_clear_errors(model):
    lr = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"ref is 20x30, smaller than the 24x24"):
        model(lr, torch.rand(1, 3, 20, 30))
    with pytest.raises(ValueError, match=r"ref\[1\] is"):
        model(lr, [torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 40)])
    with pytest.raises(ValueError, match=r"lr must be an RGB image batch \[B, 3, H, W\]"):
        model(torch.rand(1, 1, 8, 8), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="ref has batch 2 but lr has batch 1"):
        model(lr, torch.rand(2, 3, 32, 32))
    with pytest.raises(TypeError, match="ref is torch.float64 but lr is torch.float32"):
        model(lr, torch.rand(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty list"):
        model(lr, [])


def test_default_reference_minimum_is_96_pixels():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m = amsa.AMSA(ngf=8, n_blocks=1, backend="torch")
    with pytest.raises(ValueError, match=r"smaller than the 96x96 the 4 matching levels need"):
        m.match(torch.rand(1, 3, 24, 24), torch.rand(1, 3, 95, 120))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_triton_path_runs_and_is_batch_consistent():
    """On CUDA ("auto": Triton matching and deformable convolutions) the model runs on the tensors' device
    and a batch still equals its samples one at a time."""
    torch.manual_seed(2)
    m = tiny_model(backend="auto").cuda()
    lr = torch.rand(2, 3, 11, 13, device="cuda")
    ref = torch.rand(2, 3, 30, 41, device="cuda")
    with torch.no_grad():
        sr = m(lr, ref)
        assert sr.device == lr.device and sr.shape == (2, 3, 44, 52) and torch.isfinite(sr).all()
        for b in range(2):
            torch.testing.assert_close(sr[b:b + 1], m(lr[b:b + 1], ref[b:b + 1]), rtol=1e-3, atol=1e-4)


def test_official_content_takes_every_scale_from_the_unscaled_reference():
    """With official_content the content features V_i of every scale come from Ref_0: a model whose scaled
    references are replaced by Ref_0 gives the same output; the paper mode (V_i from Ref_i) differs."""
    torch.manual_seed(4)
    paper = tiny_model()
    official = tiny_model(official_content=True)
    official.load_state_dict(paper.state_dict())
    lr, ref = torch.rand(1, 3, 8, 9), torch.rand(1, 3, 32, 36)
    with torch.no_grad():
        captured = {}
        hook = official.vgg.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0]))
        out_official = official(lr, ref)
        hook.remove()
        x = captured["x"]
        assert x.shape[0] == official.ref_scales and all(torch.equal(x[i], x[0]) for i in range(x.shape[0]))
        assert not torch.allclose(out_official, paper(lr, ref))
