"""Convergence curves (paper Fig. 5, amsa.demo.convergence) against float64 references, and the Triton and
PyTorch curves (the figure scripts are tested in tests/plots/test_figures.py)."""

import pytest
import torch

import amsa
from amsa.demo.convergence import CURVE_KEYS, convergence_curve, full_iteration_flops, value_at
from amsa.matching.schedule import feature_levels
from tests.support.devices import TRITON_DEVICE
from tests.support.references import cosine_matrix64, similarity64, smooth_features
from tests.support.tolerances import assert_matches_agree


def _exact64(q: torch.Tensor, r: torch.Tensor) -> amsa.Match:
    """Enumerated matching from the float64 cosine matrix (first maximum: lowest flat index)."""
    s, j = cosine_matrix64(q, r).max(-1)
    wr = r.shape[-1]
    shape = (q.shape[0], *q.shape[-2:])
    return amsa.Match(torch.stack([j // wr, j % wr], -1).view(*shape, 2), s.view(shape))


def _curve64(m: amsa.Match, q: torch.Tensor, r: torch.Tensor, exact: amsa.Match) -> dict:
    """The curve's definitions written out plainly in float64, pixel by pixel for the warp."""
    q, r = q.double(), r.double()
    B, C, H, W = q.shape
    best = similarity64(q, r, exact.pos)
    unit = len(amsa.dilations((H, W))) * 16 * 2 * 9 * C * B * H * W
    out = {k: [] for k in CURVE_KEYS}
    done = 0
    for snap in m.history:
        done += 1 if snap.iteration else 0
        pos = snap.pos
        if pos.shape[1:3] != (H, W) or snap.ref_size != tuple(r.shape[-2:]):
            pos = amsa.upsample_positions(pos, snap.ref_size, tuple(r.shape[-2:]), (H, W))
        s = similarity64(q, r, pos)
        sq = 0.0
        for b in range(B):
            for y in range(H):
                for x in range(W):
                    (py, px), (ey, ex) = pos[b, y, x].tolist(), exact.pos[b, y, x].tolist()
                    sq += float((r[b, :, py, px] - r[b, :, ey, ex]).square().sum())
        out["iteration"].append(done)
        out["full_res_iters"].append(snap.flops / unit)
        out["level"].append(snap.level)
        out["gflops"].append(snap.flops / 1e9)
        out["mean_score"].append(float(s.mean()))
        out["agreement"].append(100.0 * float((pos == exact.pos).all(-1).double().mean()))
        out["mse_score"].append(float((s - best).square().mean()))
        out["mse_warped"].append(sq / (B * C * H * W))
    return out


def _assert_curves_close(got: dict, want: dict, atol: float = 1e-9) -> None:
    assert list(got) == list(CURVE_KEYS)
    for k in CURVE_KEYS:
        assert len(got[k]) == len(want[k]), k
        for i, (a, b) in enumerate(zip(got[k], want[k])):
            assert a == pytest.approx(b, rel=1e-9, abs=atol), (k, i, a, b)


@pytest.mark.parametrize("iters", [(3,), (1, 2), (1, 0, 2)])
def test_curve_equals_float64_reference(iters):
    """Batch 2, odd and different sizes, non-contiguous float64 features; single level and coarse-to-fine
    (coarse states brought up), zero iterations passing a level up."""
    q = smooth_features(2, 5, 19, 17, seed=3).double().transpose(2, 3)  # [2, 5, 17, 19], non-contiguous
    r = smooth_features(2, 5, 15, 21, seed=4).double()
    assert not q.is_contiguous()
    exact = _exact64(q, r)
    m = amsa.cfe_patchmatch(q, r, iters, seed=5, history=True)
    got = convergence_curve(m, q, r, exact)
    _assert_curves_close(got, _curve64(m, q, r, exact))
    assert got["iteration"][-1] == sum(iters)
    assert got["full_res_iters"][-1] == pytest.approx(m.flops / full_iteration_flops(q))


def test_curve_of_the_optimum_is_zero_and_random_is_not():
    q = smooth_features(1, 4, 16, 16, seed=1)
    r = smooth_features(1, 4, 16, 16, seed=2)
    exact = amsa.enumerated_match(q, r)
    snap = amsa.Snapshot(0, 0, exact.pos, exact.score, 10, (16, 16), (16, 16))
    c = convergence_curve(amsa.Match(exact.pos, exact.score, 10, [snap]), q, r, exact)
    assert c["mse_score"] == [0.0] and c["mse_warped"] == [0.0] and c["agreement"] == [100.0]
    m = amsa.cfe_patchmatch(q, r, (0,), seed=0, history=True)  # the random initialisation only
    c = convergence_curve(m, q, r, exact)
    assert c["mse_score"][0] > 1e-3 and c["mse_warped"][0] > 1e-3 and c["agreement"][0] < 20


def test_curve_and_value_at_bad_inputs():
    q = smooth_features(1, 3, 12, 12, seed=1)
    m = amsa.cfe_patchmatch(q, q, (1,))
    with pytest.raises(ValueError, match="history=True"):
        convergence_curve(m, q, q, m)
    h = amsa.cfe_patchmatch(q, q, (1,), history=True)
    with pytest.raises(ValueError, match="exact.pos"):
        convergence_curve(h, q, q, amsa.Match(m.pos[:, :5], m.score[:, :5]))
    assert value_at([0.0, 1.0, 1.0, 3.0], [4.0, 2.0, 1.0, 0.0], 2.0) == pytest.approx(0.5)
    assert value_at([0.0, 2.0], [1.0, 3.0], 0.0) == 1.0
    with pytest.raises(ValueError, match="outside"):
        value_at([0.0, 1.0], [1.0, 2.0], 1.5)
    with pytest.raises(ValueError, match="equally long"):
        value_at([0.0, 1.0], [1.0], 0.5)


@pytest.mark.interpret
def test_triton_and_torch_curves_agree():
    """The same study on the Triton kernels (interpreter on CPU, tiny) gives the PyTorch path's curves:
    every snapshot's positions agree up to near-ties; where they are all equal, the curves are equal."""
    q = smooth_features(1, 3, 12, 13, seed=7)
    r = smooth_features(1, 3, 11, 10, seed=8)
    exact = amsa.enumerated_match(q, r)
    for iters, oc in (((1, 1), False), ((1,), True)):
        runs, curves = [], []
        for backend in ("torch", "triton"):
            qd, rd = q.to(TRITON_DEVICE), r.to(TRITON_DEVICE)
            m = amsa.cfe_patchmatch(qd, rd, iters, seed=2, backend=backend, history=True, offset_corrected=oc)
            m = amsa.Match(m.pos.cpu(), m.score.cpu(), m.flops, [
                amsa.Snapshot(s.level, s.iteration, s.pos.cpu(), s.score.cpu(), s.flops, s.query_size,
                              s.ref_size) for s in m.history])
            runs.append(m)
            curves.append(convergence_curve(m, q, r, exact))
        q_levels, r_levels = feature_levels(q, len(iters), "q"), feature_levels(r, len(iters), "r")
        for a, b in zip(runs[0].history, runs[1].history):
            assert_matches_agree(a, b, q_levels[a.level], r_levels[a.level])
        if all(torch.equal(a.pos, b.pos) for a, b in zip(runs[0].history, runs[1].history)):
            _assert_curves_close(curves[1], curves[0], atol=1e-7)
