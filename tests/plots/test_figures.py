"""The figure scripts' quick runs on the demo pair: plots.convergence (paper Fig. 5) and
plots.scale_robustness (Fig. 7), with the properties of the paper's claims that hold there."""

import csv
import math

import pytest
import torch

from amsa.demo.convergence import value_at


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
            assert run[-1][3] < run[0][3] / 50  # and it converges far below the random start
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

    from amsa import AMSA
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


def test_fig5_causes_runner_is_cfe_patchmatch():
    """The experiment runner without a change is cfe_patchmatch (positions and FLOPs); each variant
    spends what it says (more candidates, more FLOPs) and never ends below its start."""
    import amsa
    from plots.fig5_causes import VARIANTS, Variant, run_schedule
    from tests.support.references import smooth_features

    q, r = smooth_features(1, 8, 40, 36, seed=4), smooth_features(1, 8, 44, 38, seed=5)
    for iters in ((1, 1, 2, 6), (10,), (1, 1, 1, 4)):
        m = amsa.cfe_patchmatch(q, r, iters, seed=3, backend="torch")
        pos, flops = run_schedule(q, r, Variant("as is", iters=iters), 3)
        assert torch.equal(pos, m.pos) and flops == m.flops
    base = amsa.cfe_patchmatch(q, r, (1, 1, 2, 6), seed=3, backend="torch")
    for v in VARIANTS[1:6]:
        pos, flops = run_schedule(q, r, v, 3)
        assert pos.shape == base.pos.shape and (flops > base.flops) == (v.dilation_rule != "descending"), v


def test_fig5_causes_quick(tmp_path):
    from plots.fig5_causes import VARIANTS, main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "convergence_causes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == [v.name for v in VARIANTS] + ["enumerated (exact)"]
    assert all(0 <= float(r["within_in"]) <= 100 for r in rows)
