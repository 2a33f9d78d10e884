"""The re-implementation of the official test script's PatchMatch (bench/official_matching.py) that the
fidelity table measures with: every quirk switched to our rule gives exactly cfe_patchmatch, its score is
3 x our cosine on per-pixel-normalised features, and the fidelity run works end to end."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import amsa
from bench.official_matching import QUIRKS, official_feature_match
from tests.support.references import similarity64, smooth_features
from tests.support.tolerances import assert_matches_agree, cosine_atol


def _pyramids(size=(32, 28)):
    q = smooth_features(1, 4, 32, 32, seed=1).double()
    r = smooth_features(1, 4, *size, seed=2).double()
    down = lambda x, lv: F.interpolate(x, size=(x.shape[-2] // 2**lv, x.shape[-1] // 2**lv), mode="area")
    qp = amsa.Pyramid([down(q, lv) for lv in (3, 2, 1)] + [F.normalize(q, dim=1)])
    rp = amsa.Pyramid([down(r, lv) for lv in (3, 2, 1)] + [F.normalize(r, dim=1)])
    return qp, rp


def test_every_quirk_fixed_is_cfe_patchmatch():
    qp, rp = _pyramids()
    init = torch.stack([torch.randint(0, 4, (4, 4)), torch.randint(0, 3, (4, 4))], -1)
    ours = amsa.cfe_patchmatch(qp, rp, (1, 1, 1, 4), init=init[None], backend="torch")
    pos, _ = official_feature_match(qp, rp, (1, 1, 1, 4), fix=QUIRKS, init=init)
    # float64 on both sides, the same candidates in the same order, summed in different orders: positions
    # equal up to float64 near-ties (none on this problem)
    theirs = SimpleNamespace(pos=pos[None], score=amsa.patch_similarity(qp[-1], rp[-1], pos[None]))
    assert_matches_agree(ours, theirs, qp[-1], rp[-1], dtype=torch.float64)
    # and each quirk changes something on its own
    official = official_feature_match(qp, rp, (1, 1, 1, 4), init=init)[0]
    assert (official != pos).any(-1).float().mean() > 0.05


def test_official_score_is_three_cosines_inside_and_zero_on_the_border():
    qp, rp = _pyramids()
    pos, S = official_feature_match(qp, rp, (1, 1, 1, 4), seed=3)
    cos = similarity64(qp[-1], rp[-1], pos[None])[0]
    assert (S[0] == 0).all() and (S[:, 0] == 0).all() and (S[-1] == 0).all() and (S[:, -1] == 0).all()
    assert ((S - 3 * cos)[1:-1, 1:-1].abs() <= 3 * cosine_atol(torch.float64, 4)).all()
    assert ((pos[1:-1, 1:-1] >= 1) & (pos[1:-1, 1:-1, 0:1] <= 30) & (pos[1:-1, 1:-1, 1:2] <= 26)).all()
    with pytest.raises(ValueError, match="unknown quirks"):
        official_feature_match(qp, rp, (1, 1, 1, 4), fix=("wrap",))


@pytest.mark.slow
def test_fidelity_run_small(tmp_path):
    from bench import fidelity

    assert fidelity.main(["--size", "96", "--seeds", "0", "--csv", str(tmp_path / "f.csv")]) == 0
    import csv

    rows = list(csv.DictReader((tmp_path / "f.csv").open()))
    assert [r["variant"] for r in rows][:2] == ["official test script", "official, valid_border as ours"]
    assert all(0 <= float(r["agreement_pct"]) <= 100 for r in rows)
    gaps = list(csv.DictReader((tmp_path / "f_scores.csv").open()))
    assert float(gaps[0]["max_abs_gap"]) < 1e-4 < float(gaps[1]["max_abs_gap"])  # normalised: 3 x cos
