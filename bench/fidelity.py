"""Where inference with official weights still differs from the official test script, and what each
difference does to the matches: ``python -m bench.fidelity`` -> ``bench/results/fidelity.csv`` and a
Markdown table (the README's fidelity table).

The pair: the demo pair (:func:`amsa.demo.pair.demo_pair`, HR 256x256, LR 64x64) through
``AMSA.matching_features`` (the official pyramids and per-pixel normalisation), with a fixed extractor in
place of the contrastive one (no official weights offline): the filter bank at 1/4 resolution, as the
official extractor's conv3_1 is. Every matcher is scored on the finest-level features against exact
enumerated matching: agreement (% of interior query pixels at the exact optimum), mean patch cosine, and
the % of positions that differ from the official run with the same seed. Means over ``--seeds``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from amsa import AMSA, cfe_patchmatch, enumerated_match, patch_similarity
from amsa.demo.pair import demo_pair
from amsa.models.matching_features import FilterBankExtractor
from bench.common import RESULTS, write_rows
from bench.official_matching import QUIRKS, official_feature_match, official_scores

OFFICIAL_ITERS = (1, 1, 1, 4)
QUIRK_TEXT = {
    "valid_border": "finest level: valid patches only, border scored 0 (ours: zero-padded patches)",
    "finest_dilations": "dilations of every level from the finest map's size (ours: per level)",
    "separate_sweeps": "all LR-propagation dilations, then all Ref ones (ours: LR then Ref per dilation)",
    "reflect": "LR neighbours reflected at the grid border, ties to raster order (ours: skipped, own first)",
    "wrap_jitter": "Ref candidates wrap around and are jittered (ours: clamped)",
    "round_init": "start round(U * (size - 1)), unseeded (ours: uniform integers, seeded)",
    "scale_up": "passing up: round(p * (w - 1) / (w' - 1)), 2x repeat (ours: centre-aligned)",
}


def pair_features(size: int = 256):
    """(query Pyramid, reference Pyramid) of the demo pair, as AMSA's matching stage builds them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: only the matching stage is used
        model = AMSA(ngf=8, n_blocks=1, ref_scales=1, iters=OFFICIAL_ITERS, backend="torch")
    for branch in ("feature_extraction_image1", "feature_extraction_image2"):
        setattr(model.matching_extractor, branch, torch.nn.Sequential(FilterBankExtractor(),
                                                                      torch.nn.AvgPool2d(4)))
    pair = demo_pair(size)
    return model, pair, model.matching_features(pair.lr, [pair.ref])


def _quality(q: torch.Tensor, r: torch.Tensor, pos: torch.Tensor, exact: torch.Tensor,
             official: torch.Tensor) -> dict[str, float]:
    inner = (slice(1, -1), slice(1, -1))
    score = patch_similarity(q, r, pos[None])[0][inner]
    return {"agreement_pct": 100 * (pos == exact).all(-1)[inner].double().mean().item(),
            "mean_cosine": score.double().mean().item(),
            "changed_vs_official_pct": 100 * (pos != official).any(-1)[inner].double().mean().item()}


def run(seeds: list[int], size: int = 256, log=print) -> list[dict]:
    model, pair, (query, (keys,)) = pair_features(size)
    q, r = query[-1], keys[-1]
    exact = enumerated_match(q, r).pos[0]
    rows = []

    def add(name: str, what: str, runs: list[tuple[torch.Tensor, torch.Tensor]]):
        stats = [_quality(q, r, p, exact, o) for p, o in runs]
        row = {"variant": name, "what": what, "seeds": len(seeds)}
        row.update({k: sum(s[k] for s in stats) / len(stats) for k in stats[0]})
        rows.append(row)
        log(f"{name:<34} agree {row['agreement_pct']:6.2f} %  cos {row['mean_cosine']:.4f}  "
            f"changed {row['changed_vs_official_pct']:6.2f} %")

    official = {s: official_feature_match(query, keys, OFFICIAL_ITERS, seed=s)[0] for s in seeds}
    add("official test script", "all of the below", [(official[s], official[s]) for s in seeds])
    for quirk in QUIRKS:
        add(f"official, {quirk} as ours", QUIRK_TEXT[quirk],
            [(official_feature_match(query, keys, OFFICIAL_ITERS, seed=s, fix=(quirk,))[0], official[s])
             for s in seeds])
    add("official, every quirk as ours", "= cfe_patchmatch 1-1-1-4 but for the random stream",
        [(official_feature_match(query, keys, OFFICIAL_ITERS, seed=s, fix=QUIRKS)[0], official[s])
         for s in seeds])
    for iters in (OFFICIAL_ITERS, (1, 1, 2, 6)):
        add(f"cfe_patchmatch {'-'.join(map(str, iters))}", "amsa.AMSA's matcher",
            [(cfe_patchmatch(query, keys, iters, seed=s, backend="torch").pos[0], official[s])
             for s in seeds])
    # the features: raw instead of per-pixel-normalised finest level; antialiased instead of official resizing
    model.normalize_features = False
    raw_q, (raw_r,) = model.matching_features(pair.lr, [pair.ref])
    model.normalize_features, model.resize = True, "antialias"
    aa_q, (aa_r,) = model.matching_features(pair.lr, [pair.ref])
    add("raw finest features (before)", "exact argmax of raw vs of per-pixel-normalised features",
        [(enumerated_match(raw_q[-1], raw_r[-1]).pos[0], exact)])
    add("antialiased resizing (before)", "cfe_patchmatch 1-1-1-4 on antialiased vs official pyramids",
        [(cfe_patchmatch(aa_q, aa_r, OFFICIAL_ITERS, seed=s, backend="torch").pos[0],
          cfe_patchmatch(query, keys, OFFICIAL_ITERS, seed=s, backend="torch").pos[0]) for s in seeds])
    return rows


def score_gaps(seed: int = 0, size: int = 256) -> list[dict]:
    """|3 x Match.score - official S| at the same positions (interior pixels, matched inside the
    reference's valid patches), with the finest features per-pixel normalised (now) and raw (before), and
    the resulting gap in the official softmax logits (10 S)."""
    model, pair, (query, keys) = pair_features(size)
    rows = []
    for normalised in (True, False):
        model.normalize_features = normalised
        q, (k,) = model.matching_features(pair.lr, [pair.ref])
        m = cfe_patchmatch(q, k, OFFICIAL_ITERS, seed=seed, backend="torch")
        # the official score is always taken on per-pixel-normalised features
        official = official_scores(query[-1], keys[0][-1], m.pos[0])
        gap = (3 * m.score[0].double() - official)[1:-1, 1:-1]
        gap = gap[~gap.isnan()].abs()
        rows.append({"finest_features": "per-pixel normalised" if normalised else "raw (before)",
                     "pixels": gap.numel(), "max_abs_gap": gap.max().item(),
                     "mean_abs_gap": gap.mean().item(), "max_logit_gap": 10 * gap.max().item()})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="HR size of the demo pair (LR = size / 4)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--csv", default=str(RESULTS / "fidelity.csv"))
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    path = Path(args.csv)
    gaps = score_gaps(seeds[0], args.size)
    for g in gaps:
        print(f"3 x score vs official S, {g['finest_features']}: max {g['max_abs_gap']:.3g}, mean "
              f"{g['mean_abs_gap']:.3g} over {g['pixels']} pixels (logits: max {g['max_logit_gap']:.3g})")
    for rows, out in ((run(seeds, args.size), path), (gaps, path.with_name(path.stem + "_scores.csv"))):
        write_rows(out, rows)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
