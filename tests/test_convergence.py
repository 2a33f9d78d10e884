"""Convergence studies (paper Fig. 5 and Fig. 7): amsa.convergence against float64 references, the Triton
and PyTorch curves, and the quick runs of plots.convergence / plots.scale_robustness on the demo pair."""

import csv
import math

import pytest
import torch
from conftest import TRITON_DEVICE
from patchmatch_ref import cosine_matrix64, similarity64, smooth_features

import amsa
from amsa.convergence import CURVE_KEYS, convergence_curve, full_iteration_flops, value_at


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
    """The same study on the Triton kernels (interpreter on CPU, tiny) gives the PyTorch path's curves."""
    q = smooth_features(1, 3, 12, 13, seed=7)
    r = smooth_features(1, 3, 11, 10, seed=8)
    exact = amsa.enumerated_match(q, r)
    for iters, oc in (((1, 1), False), ((1,), True)):
        curves = []
        for backend in ("torch", "triton"):
            qd, rd = q.to(TRITON_DEVICE), r.to(TRITON_DEVICE)
            m = amsa.cfe_patchmatch(qd, rd, iters, seed=2, backend=backend, history=True, offset_corrected=oc)
            curves.append(convergence_curve(amsa.Match(m.pos.cpu(), m.score.cpu(), m.flops, [
                amsa.Snapshot(s.level, s.iteration, s.pos.cpu(), s.score.cpu(), s.flops, s.query_size,
                              s.ref_size) for s in m.history]), q, r, exact))
        _assert_curves_close(curves[1], curves[0], atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# The quick runs of the figure scripts, on the demo pair


@pytest.fixture(scope="module")
def fig5(tmp_path_factory):
    from plots.convergence import main

    out = tmp_path_factory.mktemp("fig5")
    assert main(["--quick", "--out", str(out)]) == 0
    for name in ("convergence.png", "convergence.csv", "convergence_summary.csv"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "convergence.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "convergence_summary.csv") as f:
        summary = {r["method"]: r for r in csv.DictReader(f)}
    return rows, summary


def _runs(rows, method):
    """{seed: [(level, iteration, gflops, mse_score, agreement), ...]} of one method."""
    runs = {}
    for r in rows:
        if r["method"] == method:
            runs.setdefault(r["seed"], []).append(
                (int(r["level"]), int(r["iteration"]), float(r["gflops"]), float(r["mse_score"]),
                 float(r["agreement"])))
    return runs


def test_fig5_mse_never_increases_at_full_resolution(fig5):
    """Within the iterations at full resolution, MSE(S) never increases (scores only rise and the optimum
    bounds them); for single-level full-resolution PatchMatch that is the whole curve."""
    rows, summary = fig5
    assert len(summary) == 8
    for method in summary:
        if summary[method]["iters"].endswith("-0"):
            continue  # single-level runs on a coarse level: no iteration at full resolution
        for seed, run in _runs(rows, method).items():
            top = max(level for level, *_ in run)
            fine = [mse for level, _, _, mse, _ in run if level == top]
            assert len(fine) >= 5 and all(b <= a + 1e-12 for a, b in zip(fine, fine[1:])), (method, seed)
            assert run[-1][3] < run[0][3] / 100  # and it converges far below the random start
    full = _runs(rows, "PatchMatch 1 (full)")
    for run in full.values():
        assert [it for _, it, *_ in run] == list(range(11))


def test_fig5_cfe_beats_single_level_at_equal_flops(fig5):
    """The paper's claim, in the form that holds on the demo pair: for every budget up to one
    full-resolution iteration, CFE-PatchMatch (paper schedule) has a lower MSE(S) than single-level
    full-resolution PatchMatch given the same FLOPs (both curves linearly interpolated in FLOPs, mean
    over seeds). At CFE's final FLOP count the single-level run is ahead (see the summary)."""
    rows, summary = fig5
    cfe, full = _runs(rows, "CFE paper 1-1-2-6"), _runs(rows, "PatchMatch 1 (full)")
    one_iteration = next(g for _, it, g, *_ in next(iter(full.values())) if it == 1)
    start = max(next(iter(cfe.values()))[0][2], next(iter(full.values()))[0][2])

    def at(runs, budget):
        values = [value_at([p[2] for p in run], [p[3] for p in run], budget) for run in runs.values()]
        return sum(values) / len(values)

    for budget in torch.logspace(math.log10(start), math.log10(one_iteration), 8).tolist():
        budget = min(max(budget, start), one_iteration)  # logspace rounds its end points
        assert at(cfe, budget) < at(full, budget), budget


def test_truth_in_resized_reference():
    from plots.scale_robustness import multi_scale, truth_in

    t = torch.tensor([[[0.0, 0.0], [9.0, 19.0]]])
    assert torch.equal(truth_in(t, (10, 20), (10, 20)), t)
    # pixel centres map to pixel centres: the last pixel of a 10-pixel axis to the last of a 5-pixel axis
    got = truth_in(t, (10, 20), (5, 10))
    assert torch.allclose(got, torch.tensor([[[-0.25, -0.25], [4.25, 9.25]]]))
    sizes = [tuple(r.shape[-2:]) for r in multi_scale(torch.rand(1, 3, 64, 80))]
    assert sizes == [(64, 80), (51, 64), (41, 51), (33, 41), (26, 33)]  # k = 0.8, n = 5, sizes rounded


def test_fig7_multi_scale_recovers_a_larger_reference(tmp_path):
    """With the reference 1.6x the HR scale the single reference is mostly mismatched, while the best of
    the 5 scales (one of them 1.6 * 0.8^2 = 1.02) finds the true correspondence; at equal scales both
    work. The multi-scale score is never below the single one (it is a maximum that includes it)."""
    from plots.scale_robustness import main

    assert main(["--quick", "--ratios", "1.6,1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "scale_robustness.png").stat().st_size > 0
    with open(tmp_path / "scale_robustness.csv") as f:
        rows = {(float(r["rho"]), r["variant"].split()[0]): r for r in csv.DictReader(f)}
    assert len(rows) == 4
    val = lambda rho, v, key: float(rows[rho, v][key])
    for rho in (1.6, 1.0):
        assert val(rho, "multi-scale", "mean_score") >= val(rho, "single-scale", "mean_score")
        assert int(rows[rho, "single-scale"]["overlap_pixels"]) > 500
    assert val(1.6, "single-scale", "within_px") < 40 < 60 < val(1.6, "multi-scale", "within_px")
    assert abs(math.log(val(1.6, "multi-scale", "chosen_scale"))) < 0.25
    assert val(1.0, "single-scale", "within_px") > 60 and val(1.0, "multi-scale", "within_px") > 60
    with pytest.raises(SystemExit, match="ratios"):
        main(["--quick", "--ratios", "8", "--out", str(tmp_path)])


def test_fig7_sr_psnr_with_weights(tmp_path):
    """--weights adds the SR PSNR of AMSA with one and with five reference scales (here random weights of
    the official size: the plumbing, not the numbers)."""
    import warnings

    from amsa.model import AMSA
    from plots.scale_robustness import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn
        torch.save(AMSA().net.state_dict(), tmp_path / "restoration.pth")
    with pytest.raises(SystemExit, match="96"):
        main(["--quick", "--weights", str(tmp_path / "restoration.pth"), "--out", str(tmp_path)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = str(tmp_path / "restoration.pth")
        assert main(["--size", "96", "--ratios", "1", "--seeds", "0", "--weights", weights,
                     "--out", str(tmp_path)]) == 0
    with open(tmp_path / "scale_robustness_psnr.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["variant"] for r in got] == ["single-scale", "multi-scale n=5 k=0.8"]
    assert all(5 < float(r["psnr"]) < 60 for r in got) and got[0]["psnr"] != got[1]["psnr"]
