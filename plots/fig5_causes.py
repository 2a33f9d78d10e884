"""Why single-level PatchMatch catches up with CFE-PatchMatch on our pairs (README, Fig. 5): experiments.

``python -m plots.fig5_causes`` runs CFE-PatchMatch 1-1-2-6 on the Fig. 5 pairs (:mod:`plots._pairs`)
with one change at a time to the parts the paper leaves open, and reports the final state against
enumerated matching and against the truth, beside single-level full-resolution PatchMatch (10
iterations):

* ``features``: learned (``--features``, default) against the filter bank on the same grid (run the
  script with ``--features filter-bank-4``);
* ``dilations``: the paper's sweep ``k = 1, 2, .., 2^(T-1)``, ``T = floor(log2(min(h, w) / 8))``, against
  a sweep to a quarter of the map (``T = floor(log2(min(h, w) / 4))``, farther jumps) and the same
  dilations largest first (jump flooding's order);
* ``pass-up``: a fine pixel takes its parent's match (ours), or the best of the matches of the parent
  and its 8 neighbours brought up (9 candidates);
* ``level random``: at every level entry one extra uniformly random candidate per pixel (the paper's
  initialisation "randomly or according to the previous map", both at once);
* ``random search``: classic PatchMatch random search after every iteration (Barnes et al. 2009: one
  candidate per radius max(Hr, Wr) / 2^i around the current match, down to 1 pixel).

The runner (:func:`run_schedule`) is cfe_patchmatch's loop written out with the PyTorch path's level
object (:class:`amsa.matching.torch_backend.TorchLevel`, a documented internal); with no change it
returns exactly :func:`amsa.cfe_patchmatch`'s positions (tested). FLOPs are counted as there: one 3x3xC
inner product per candidate and pixel. Writes ``convergence_causes.csv``. ``--quick``: the demo pair
at 96 pixels, one seed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import amsa
from amsa.matching.schedule import (
    CANDIDATES_PER_STEP,
    dilations,
    evaluation_flops,
    feature_levels,
    random_positions,
    upsample_positions,
)
from amsa.matching.torch_backend import TorchLevel
from bench.common import write_rows
from plots._common import output_dir, parse_ints
from plots._pairs import study_pairs
from plots.convergence import FEATURES, matching_features

PAPER = (1, 1, 2, 6)


@dataclass(frozen=True)
class Variant:
    name: str
    iters: tuple[int, ...] = PAPER
    dilation_rule: str = "paper"  # "paper" | "quarter" | "descending"
    pass_up: str = "parent"  # "parent" | "neighbours"
    level_random: bool = False
    random_search: bool = False


VARIANTS = (
    Variant("CFE 1-1-2-6 (paper, ours)"),
    Variant("dilations to a quarter of the map", dilation_rule="quarter"),
    Variant("dilations largest first", dilation_rule="descending"),
    Variant("pass-up: best of parent + 8 neighbours", pass_up="neighbours"),
    Variant("one random candidate per level entry", level_random=True),
    Variant("random search after every iteration", random_search=True),
    Variant("single level, full resolution, 10 it", iters=(10,)),
    Variant("single level, full resolution, 10 it + random search", iters=(10,), random_search=True),
)


def _dilations(size: tuple[int, int], rule: str) -> list[int]:
    if rule == "quarter":
        return [2**t for t in range(max(1, int(torch.tensor(min(size) / 4).log2().floor())))]
    ks = dilations(size)
    return ks[::-1] if rule == "descending" else ks


def _keep_better(level: TorchLevel, pos, score, cand):
    """Evaluate candidate positions ``cand`` [B, h, w, 2] and keep them where strictly better."""
    s = level.score_positions(cand)
    better = s > score
    return torch.where(better[..., None], cand, pos), torch.where(better, s, score)


def _random_search(level: TorchLevel, pos, score, g: torch.Generator):
    """Barnes et al.'s random search: one candidate per radius; returns (pos, score, candidates)."""
    hr, wr = level.rsize
    radius, n = float(max(hr, wr)), 0
    limit = torch.tensor([hr - 1, wr - 1], device=pos.device)
    while radius >= 1:
        u = torch.rand(pos.shape, generator=g).to(pos.device) * 2 - 1
        cand = torch.minimum((pos + (u * radius).round().long()).clamp_min(0), limit)
        pos, score = _keep_better(level, pos, score, cand)
        radius, n = radius / 2, n + 1
    return pos, score, n


def _pass_up_neighbours(level: TorchLevel, coarse, prev_rsize, rsize, qsize):
    """The matches of the parent and of its 8 neighbours, each brought up with the fine pixel's own
    sub-cell offset; the best of the 9 (ties: the parent first)."""
    pad = F.pad(coarse.permute(0, 3, 1, 2).double(), (1, 1, 1, 1), mode="replicate")
    pad = pad.long().permute(0, 2, 3, 1)
    h, w = coarse.shape[1:3]
    pos = upsample_positions(coarse, prev_rsize, rsize, qsize)
    score = level.score_positions(pos)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                shifted = pad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                cand = upsample_positions(shifted, prev_rsize, rsize, qsize)
                pos, score = _keep_better(level, pos, score, cand)
    return pos, score


def run_schedule(query: torch.Tensor, ref: torch.Tensor, v: Variant, seed: int) -> tuple[torch.Tensor, int]:
    """CFE-PatchMatch of ``query`` [B, C, H, W] against ``ref`` with variant ``v``; (positions, FLOPs)."""
    q_levels = feature_levels(query, len(v.iters), "query")
    r_levels = feature_levels(ref, len(v.iters), "ref")
    B, C = query.shape[:2]
    g = torch.Generator().manual_seed(10_000 + seed)
    pos = score = None
    flops = 0
    for lv, n_iter in enumerate(v.iters):
        level = TorchLevel(q_levels[lv], r_levels[lv])
        qsize, rsize = tuple(q_levels[lv].shape[-2:]), tuple(r_levels[lv].shape[-2:])
        per_eval = evaluation_flops(B, C, qsize)
        if lv == 0:
            pos = random_positions(*qsize, *rsize, seed, query.device).expand(B, -1, -1, -1)
            score = level.score_positions(pos)
            flops += per_eval
        elif v.pass_up == "neighbours":
            pos, score = _pass_up_neighbours(level, pos, tuple(r_levels[lv - 1].shape[-2:]), rsize, qsize)
            flops += 9 * per_eval
        else:
            pos = upsample_positions(pos, tuple(r_levels[lv - 1].shape[-2:]), rsize, qsize)
            score = level.score_positions(pos)
            flops += per_eval
        if v.level_random and lv > 0:
            cand = torch.stack([torch.randint(0, rsize[0], (B, *qsize), generator=g),
                                torch.randint(0, rsize[1], (B, *qsize), generator=g)], -1).to(query.device)
            pos, score = _keep_better(level, pos, score, cand)
            flops += per_eval
        for _ in range(n_iter):
            for k in _dilations(qsize, v.dilation_rule):
                pos, score = level.step(pos, score, k, False)
                flops += CANDIDATES_PER_STEP * per_eval
            if v.random_search:
                pos, score, n = _random_search(level, pos, score, g)
                flops += n * per_eval
    return pos, flops


def measure(query, ref, truth, inside, exact, variants, seeds) -> list[dict]:
    best = amsa.patch_similarity(query, ref, exact.pos).double()
    inside = inside[None]
    rows = []
    for v in variants:
        acc = []
        for seed in seeds:
            pos, flops = run_schedule(query, ref, v, seed)
            s = amsa.patch_similarity(query, ref, pos).double()
            same = (pos == exact.pos).all(-1)
            near = (pos.double() - truth.double()).norm(dim=-1) <= 2
            acc.append({"gflops": flops / 1e9, "mse_score": (s - best).square().mean().item(),
                        "agreement_in": 100 * same[inside].double().mean().item(),
                        "agreement_out": 100 * same[~inside].double().mean().item(),
                        "within_in": 100 * near[inside].double().mean().item()})
        rows.append({"variant": v.name, "seeds": len(seeds),
                     **{k: sum(a[k] for a in acc) / len(acc) for k in acc[0]}})
    exact_near = (exact.pos.double() - truth.double()).norm(dim=-1) <= 2
    rows.append({"variant": "enumerated (exact)", "seeds": 1, "gflops": exact.flops / 1e9,
                 "mse_score": 0.0, "agreement_in": 100.0, "agreement_out": 100.0,
                 "within_in": 100 * exact_near[inside].double().mean().item()})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plots.fig5_causes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=None, help="pair size in pixels (default 384, --quick 96)")
    ap.add_argument("--seeds", type=parse_ints, default=None, help="default 0,1,2 (--quick: 0)")
    ap.add_argument("--pairs", default=None, help="comma-separated of demo, coffee, stereo (default all)")
    ap.add_argument("--features", choices=FEATURES, default="learned")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    size = args.size or (96 if args.quick else 384)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = output_dir(args.out, args.quick)
    feats = matching_features(args.features)
    rows = []
    for p in study_pairs((args.pairs or ("demo" if args.quick else "demo,coffee,stereo")).split(","), size):
        with torch.no_grad():
            q, r = feats(p.lr_up, p.ref)
            truth, inside = p.truth(feats.stride)
            exact = amsa.enumerated_match(q, r)
            pair_rows = measure(q, r, truth, inside, exact, VARIANTS, seeds)
        print(f"{p.label}, {feats.name} features on a {tuple(q.shape[-2:])} grid, seeds {seeds}")
        print(f"{'variant':<54} {'GFLOPs':>7} {'MSE(S)':>9} {'agree in':>9} {'agree out':>10} "
              f"{'within 2':>9}")
        for row in pair_rows:
            print(f"{row['variant']:<54} {row['gflops']:>7.2f} {row['mse_score']:>9.3g} "
                  f"{row['agreement_in']:>9.1f} {row['agreement_out']:>10.1f} {row['within_in']:>9.1f}")
            rows.append({"pair": p.name, "features": args.features, **row})
    suffix = "" if args.features == "learned" else "_" + args.features
    write_rows(os.path.join(out, f"convergence_causes{suffix}.csv"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
