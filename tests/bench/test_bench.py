"""The benchmark suite: baselines against float64 references and the library, analytic FLOPs against
Match.flops and the paper's Table 2, budgeted skips, and a quick smoke run of the suite and the plots."""

import csv
import time

import pytest
import torch

import amsa
from bench import baselines, flops
from bench.common import FIELDS, append_rows, measure
from tests.support.references import cosine_matrix64, smooth_features
from tests.support.tolerances import assert_matches_agree


def _flat(m, wr):
    return (m.pos[..., 0] * wr + m.pos[..., 1]).flatten(1)


def _exact(q, r):
    return cosine_matrix64(q, r).max(-1)


def _exact_match(q, r) -> amsa.Match:
    """The float64 argmax as a Match (lowest flat index among exact ties)."""
    s, j = _exact(q, r)
    shape = (q.shape[0], *q.shape[-2:])
    return amsa.Match(torch.stack([j // r.shape[-1], j % r.shape[-1]], -1).view(*shape, 2), s.view(shape))


@pytest.mark.parametrize("matcher", [
    lambda q, r: baselines.c2_enumerated(q, r, chunk=7),
    lambda q, r: baselines.chunked_matmul_argmax(q, r, precision="fp32", block=10),
    lambda q, r: baselines.chunked_matmul_argmax(q, r, precision="tf32"),
])
def test_enumerated_baselines_are_the_exact_argmax(matcher):
    q = torch.randn(2, 5, 11, 13).transpose(2, 3)  # non-contiguous, odd sizes, batch 2
    r = torch.randn(2, 5, 9, 14)
    m = matcher(q, r)
    assert_matches_agree(m, _exact_match(q, r), q, r)  # the float64 argmax, up to fp32 near-ties
    assert_matches_agree(m, amsa.enumerated_match(q, r), q, r)
    assert m.flops == 2 * 9 * 5 * 2 * (13 * 11) * (9 * 14)  # 2 x 3x3xC per patch pair, B = 2


def test_enumerated_baselines_reference_lists_and_zero_patches():
    q, refs = torch.randn(1, 4, 10, 9), [torch.randn(1, 4, 8, 7), torch.randn(1, 4, 12, 5)]
    q[..., :3, :3] = 0
    for m, r in zip(baselines.c2_enumerated(q, refs), refs):
        assert_matches_agree(m, amsa.enumerated_match(q, r), q, r)
        assert (m.score[0, :2, :2] == 0).all()


def test_bf16_matmul_argmax_is_the_argmax_of_the_bf16_problem():
    from amsa.matching.torch_backend import unfold_normalised

    q, r = torch.randn(2, 16, 12, 11), torch.randn(2, 16, 10, 12)
    m = baselines.chunked_matmul_argmax(q, r, block=33)  # blocks that do not divide Nr = 120
    bf = lambda x: unfold_normalised(x).to(torch.bfloat16).double()
    S = bf(q) @ bf(r).transpose(1, 2)  # the bf16-rounded problem, in float64
    chosen = S.gather(2, _flat(m, 12)[..., None])[..., 0]
    # Its optimum up to the bf16 rounding of the output block (torch's bf16 matmul returns bf16): 1 ulp.
    assert (S.max(-1).values - chosen).max() <= 2**-8
    exact, _ = _exact(q, r)
    assert (exact - amsa.patch_similarity(q, r, m.pos).double().flatten(1)).max() < 2e-2


@pytest.mark.parametrize("iters", [(1, 1, 2), (3,)])
def test_official_patchmatch_runs_our_algorithm_exactly(iters):
    q = smooth_features(2, 4, 26, 29, seed=1).double()
    refs = [smooth_features(2, 4, 27, 25, seed=2).double(), smooth_features(2, 4, 21, 30, seed=3).double()]
    ours = amsa.cfe_patchmatch(q, refs, iters, seed=5, backend="torch")
    official = baselines.official_patchmatch(q, refs, iters, seed=5)
    for a, b, r in zip(ours, official, refs):
        assert_matches_agree(a, b, q, r, dtype=torch.float64)  # differently summed: up to near-ties
        assert b.flops == flops.official_patchmatch_flops(2, 4, (26, 29), iters)


def test_official_patchmatch_fp32_agrees():
    q, r = smooth_features(1, 8, 30, 30, seed=4), smooth_features(1, 8, 30, 30, seed=6)
    a = amsa.cfe_patchmatch(q, r, backend="torch")
    b = baselines.official_patchmatch(q, r)
    assert (a.pos == b.pos).all(-1).double().mean() > 0.99  # fp32 near-ties may round differently


def test_baselines_reject_bad_input():
    with pytest.raises(ValueError, match=r"ref has 3 channels but query has 4"):
        baselines.c2_enumerated(torch.randn(1, 4, 8, 8), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="precision"):
        baselines.chunked_matmul_argmax(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), precision="fp8")
    bad = torch.randn(1, 4, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="query contains NaN"):
        baselines.official_patchmatch(bad, torch.randn(1, 4, 8, 8), (1,))


@pytest.mark.parametrize("size,iters,refs", [((37, 29), (1, 1, 2, 6), 1), ((64, 50), (1, 1, 1, 4), 3),
                                             ((25, 31), (10,), 2)])
def test_patchmatch_flops_equal_match_flops(size, iters, refs):
    q = torch.randn(2, 3, *size)
    rs = [torch.randn(2, 3, 30 + i, 27) for i in range(refs)]
    ms = amsa.cfe_patchmatch(q, rs, iters)
    assert sum(m.flops for m in ms) == flops.patchmatch_flops(2, 3, size, iters, refs)


def test_table2_reconciliation():
    t = {r["line"]: r for r in flops.table2()}
    assert round(t["enumerated, 1 ref"]["paper_rule_gmac"], 2) == 8715.44
    assert round(t["enumerated, 5 refs (MSDA)"]["paper_rule_gmac"], 2) == 29297.82
    for line in ("CFE-PatchMatch 1-1-2-6, 1 ref", "CFE-PatchMatch 1-1-2-6, 5 refs (MSDA)"):
        assert abs(t[line]["paper_rule_gmac"] / t[line]["paper"] - 1) < 0.01
    assert t["enumerated, 1 ref"]["ours_gflop"] == 2 * 9 * 256 * 250**4 / 1e9


def test_measure_quantiles_and_budget():
    calls = []
    t = measure(lambda: calls.append(1) or len(calls), "cpu", quick=True)
    assert t.p20_ms <= t.p50_ms <= t.p80_ms and t.result == 1 and len(calls) == 4 and t.peak_mem_mb is None
    slow = measure(lambda: time.sleep(0.05), "cpu", budget_s=0.06)
    assert slow.p50_ms >= 50 and slow.p50_ms == slow.p80_ms  # one timed call fits the budget


def test_append_rows_rejects_unknown_fields(tmp_path):
    with pytest.raises(ValueError, match="speedup"):
        append_rows([{"bench": "matching", "speedup": 2}], tmp_path / "r.csv")


def test_planner_skips_with_reasons():
    from bench.patchmatch import Planner, bench_config, features

    q, refs = features("random", 24, 4, 1, 1, "cpu")
    rows = bench_config(q, refs, (1, 1, 1, 1), ["enumerated/fp32"], Planner("cpu", budget_s=1e-9),
                        quick=True, data="random", log=lambda *a: None)
    assert rows[0]["status"] == "skipped" and "estimated" in rows[0]["note"]
    late = Planner("cpu", budget_s=10, deadline=time.monotonic() - 1)
    rows = bench_config(q, refs, (1, 1, 1, 1), ["cfe_patchmatch/torch"], late, quick=True, data="random",
                        log=lambda *a: None)
    assert rows[0]["status"] == "skipped" and rows[0]["note"] == "suite time budget exhausted"


@pytest.mark.slow
def test_suite_quick_smoke_and_plots(tmp_path):
    from bench import deform_conv, suite
    from plots import benchmarks

    path = tmp_path / "results.csv"
    assert suite.main(["--quick", "--sections", "matching,step,model", "--csv", str(path)]) == 0
    append_rows(deform_conv.run("cpu", True, torch.float32, ["fwd", "bwd"], ["amsa-torch"],
                                log=lambda *a: None), path)
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == FIELDS
    match = [r for r in rows if r["bench"] == "matching"]
    ok = [r for r in match if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"enumerated/fp32", "cfe_patchmatch/torch", "official_patchmatch/torch",
                                       "c2_enumerated/fp32", "matmul_argmax/bf16"}
    for r in ok:
        assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert float(r["agreement_pct"]) > 80 and float(r["gflops"]) > 0 and r["device"] and r["commit"]
    assert all(r["note"] for r in match if r["status"] != "ok")  # every skip says why
    assert {r["mode"] for r in rows if r["bench"] == "model"} >= {"matching", "aggregation", "rest", "total"}
    assert {r["bench"] for r in rows} == {"matching", "step", "model", "deform_conv"}
    assert benchmarks.main(["--csv", str(path), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "matching_time.png").stat().st_size > 0
    assert "`official_patchmatch/torch`" in (tmp_path / "summary.md").read_text()
