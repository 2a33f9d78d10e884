"""The paper's Fig. 5: convergence of (CFE-)PatchMatch to enumerated matching, on real pairs with known
geometry.

``python -m plots.convergence`` matches three pairs whose true correspondences are known:

* ``demo``: the demo pair (:func:`amsa.demo.pair.demo_pair`: an HR crop of matplotlib's photo against a
  crop of the photo rescaled by 0.8 and shifted);
* ``coffee``: scikit-image's ``coffee.png`` and a random homography warp of it (scale, rotation, shift,
  perspective: :class:`amsa.training.pairs.HomographyPairSet`, seed 5);
* ``stereo``: scikit-image's Middlebury stereo pair (``motorcycle_left/right`` with its disparity map:
  left pixel (y, x) is right pixel (y, x - d); occluded pixels have no correspondence);

(the last two need scikit-image installed; none of the three photos is in the extractor's training set)
with

* Embedded PatchMatch on a single level, 1/8, 1/4, 1/2 or full resolution, 10 iterations (iters
  ``(10, 0, 0, 0)`` .. ``(10,)``: zero iterations only pass the result up),
* CFE-PatchMatch with the paper's schedule 1-1-2-6 and the official release's 1-1-1-4, each in the
  paper's propagation form and offset-corrected,

for several seeds, on the features of :func:`amsa.models.matching_features.default_matching_features`
(the learned extractor on the 1/4 grid, as AMSA matches; ``--features filter-bank`` for the fixed filter
bank at full resolution, ``filter-bank-4`` for it on the 1/4 grid), and compares every iteration's state,
brought to full resolution, with enumerated matching on the same features (:mod:`amsa.demo.convergence`
defines the MSEs, both iteration counts and the per-kind metrics: pixels whose true correspondence lies
inside the reference or not, and the % within 2 grid pixels of the truth). Writes per pair
``convergence[_NAME].png``
(curves against iterations and cumulative FLOPs; mean over seeds, min-max band), ``.csv`` (every curve
point of every seed) and ``_summary.csv`` (final values per schedule, single-level full-resolution
PatchMatch at CFE's final FLOP count, and the FLOPs from which single-level stays ahead of CFE).
``--pair HR REF`` adds a pair of your own (no truth). ``--quick``: the demo pair only, small, two seeds,
to ``out/plots``.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch

import amsa
from amsa.backends import BACKENDS
from amsa.demo.convergence import CURVE_KEYS, TRUTH_KEYS, convergence_curve, value_at
from amsa.models.matching_features import MatchingFeatures, default_matching_features
from bench.common import write_rows
from plots._common import mean_band, output_dir, parse_ints, user_pair
from plots._pairs import StudyPair, study_pairs


@dataclass(frozen=True)
class Method:
    name: str
    iters: tuple[int, ...]
    offset_corrected: bool = False
    colour: str = "black"
    style: str = "-"

    @property
    def single_level(self) -> bool:
        return len([n for n in self.iters if n]) == 1


ITERATIONS = 10  # single-level runs: the paper's Fig. 5 shows 10 iterations
METHODS = (
    Method("PatchMatch 1/8", (ITERATIONS, 0, 0, 0), colour="#c7dcef"),
    Method("PatchMatch 1/4", (ITERATIONS, 0, 0), colour="#8fbbdf"),
    Method("PatchMatch 1/2", (ITERATIONS, 0), colour="#4a8dc8"),
    Method("PatchMatch 1 (full)", (ITERATIONS,), colour="#08306b"),
    Method("CFE paper 1-1-2-6", (1, 1, 2, 6), colour="tab:red"),
    Method("CFE official 1-1-1-4", (1, 1, 1, 4), colour="tab:orange"),
    Method("CFE paper 1-1-2-6, offset-corr.", (1, 1, 2, 6), True, colour="tab:red", style="--"),
    Method("CFE official 1-1-1-4, offset-corr.", (1, 1, 1, 4), True, colour="tab:orange", style="--"),
)
FULL = METHODS[3]  # single-level full resolution: the equal-FLOPs baseline


def run_pair(query: torch.Tensor, ref: torch.Tensor, seeds: list[int], *, backend: str = "auto",
             methods: tuple[Method, ...] = METHODS, truth: torch.Tensor | None = None,
             inside: torch.Tensor | None = None, log=print) -> tuple[amsa.Match, dict[str, list[dict]]]:
    """Enumerated matching once, then every method for every seed with ``history=True``; returns the
    enumerated match and, per method name, one :func:`amsa.demo.convergence.convergence_curve` per seed
    (with the per-kind metrics where ``truth`` and ``inside`` are given)."""
    t0 = time.perf_counter()
    exact = amsa.enumerated_match(query, ref)
    log(f"  enumerated matching: {exact.flops / 1e9:.1f} GFLOPs, {time.perf_counter() - t0:.1f} s")
    curves: dict[str, list[dict]] = {}
    for m in methods:
        t0 = time.perf_counter()
        curves[m.name] = [
            convergence_curve(amsa.cfe_patchmatch(query, ref, m.iters, seed=s, backend=backend, history=True,
                                                  offset_corrected=m.offset_corrected), query, ref, exact,
                              truth=truth, inside=inside)
            for s in seeds
        ]
        log(f"  {m.name}: {len(seeds)} seeds, {time.perf_counter() - t0:.1f} s")
    return exact, curves


def curve_rows(pair: str, seeds: list[int], curves: dict[str, list[dict]],
               methods: tuple[Method, ...] = METHODS) -> list[dict]:
    """Long-format CSV rows: one per method, seed and snapshot."""
    rows = []
    for m in methods:
        for seed, c in zip(seeds, curves[m.name]):
            for i in range(len(c["iteration"])):
                rows.append({"pair": pair, "method": m.name, "iters": "-".join(map(str, m.iters)),
                             "offset_corrected": int(m.offset_corrected), "seed": seed, "snapshot": i,
                             **{k: c[k][i] for k in CURVE_KEYS + TRUTH_KEYS if k in c}})
    return rows


def _stats(values: list[float]) -> tuple[float, float, float]:
    return sum(values) / len(values), min(values), max(values)


def summary_rows(pair: str, curves: dict[str, list[dict]], methods: tuple[Method, ...] = METHODS,
                 baseline: Method = FULL) -> list[dict]:
    """Final state of every method (mean, min, max over seeds), and for every method the single-level
    full-resolution baseline's MSE and agreement interpolated at that method's final FLOP count (mean
    over seeds; empty where the count lies outside the baseline's curve)."""
    rows = []
    for m in methods:
        runs = curves[m.name]
        row = {"pair": pair, "method": m.name, "iters": "-".join(map(str, m.iters)),
               "offset_corrected": int(m.offset_corrected), "seeds": len(runs),
               "iterations": runs[0]["iteration"][-1],
               "full_res_iters": round(runs[0]["full_res_iters"][-1], 4),
               "gflops": round(runs[0]["gflops"][-1], 5)}
        for key in ("mse_score", "mse_warped", "agreement", "mean_score", *TRUTH_KEYS):
            if key not in runs[0]:
                continue
            mean, lo, hi = _stats([c[key][-1] for c in runs])
            row.update({f"{key}_mean": f"{mean:.6g}", f"{key}_min": f"{lo:.6g}", f"{key}_max": f"{hi:.6g}"})
        base, final = curves.get(baseline.name), runs[0]["gflops"][-1]
        for key in ("mse_score", "agreement"):
            at = ""
            if base is not None and base[0]["gflops"][0] <= final <= base[0]["gflops"][-1]:
                at = f"{_stats([value_at(b['gflops'], b[key], final) for b in base])[0]:.6g}"
            row[f"full_res_{key}_at_same_flops"] = at
        for key in ("mse_score", "within_in"):
            if key in runs[0]:
                x = None if base is None or m.single_level else overtake_gflops(
                    runs, base, key, lower_is_better=key.startswith("mse"))
                row[f"full_res_ahead_from_gflops_{key}"] = "" if x is None else f"{x:.4g}"
        rows.append(row)
    return rows


def _mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
    t = torch.tensor([c[key] for c in runs], dtype=torch.float64)
    return runs[0]["gflops"], t.mean(0).tolist()


def overtake_gflops(runs: list[dict], base: list[dict], key: str, *, lower_is_better: bool) -> float | None:
    """The FLOP count from which the single-level baseline ``base`` stays ahead of ``runs`` (mean curves
    over seeds, linearly interpolated in FLOPs, up to the end of the shorter curve); ``None`` if it is not
    ahead there. Ahead: lower ``key`` (MSE) or higher (agreement, within)."""
    xs, ys = _mean_curve(runs, key)
    bx, by = _mean_curve(base, key)
    lo, hi = max(xs[0], bx[0]), min(xs[-1], bx[-1])
    grid = sorted({x for x in xs + bx if lo <= x <= hi})
    sign = 1.0 if lower_is_better else -1.0
    gap = [sign * (value_at(xs, ys, x) - value_at(bx, by, x)) for x in grid]  # > 0: baseline ahead
    if not gap or gap[-1] <= 0:
        return None
    i = len(gap) - 1
    while i > 0 and gap[i - 1] > 0:
        i -= 1
    if i == 0:
        return grid[0]
    x0, x1, g0, g1 = grid[i - 1], grid[i], gap[i - 1], gap[i]
    return x0 + (x1 - x0) * (-g0) / (g1 - g0)


def format_summary(rows: list[dict]) -> str:
    truth = "within_in_mean" in rows[0]
    head = ["method", "GFLOPs", "full-res its", "MSE(S)", "agreement %"]
    if truth:
        head += ["MSE(S) in / out", "agree in / out %", "within 2 px %"]
    head += ["1-level full at same FLOPs: MSE(S), agr. %", "1-level ahead from GFLOPs (MSE / within)"]
    body = []
    f = lambda r, k: float(r[f"{k}_mean"])
    for r in rows:
        same = "-"
        if r["full_res_mse_score_at_same_flops"]:
            same = (f"{float(r['full_res_mse_score_at_same_flops']):.3g}, "
                    f"{float(r['full_res_agreement_at_same_flops']):.1f}")
        cells = [r["method"], f"{r['gflops']:.2f}", f"{r['full_res_iters']:.2f}", f"{f(r, 'mse_score'):.3g}",
                 f"{f(r, 'agreement'):.1f} ({float(r['agreement_min']):.1f}-{float(r['agreement_max']):.1f})"]
        if truth:
            cells += [f"{f(r, 'mse_score_in'):.3g} / {f(r, 'mse_score_out'):.3g}",
                      f"{f(r, 'agreement_in'):.1f} / {f(r, 'agreement_out'):.1f}", f"{f(r, 'within_in'):.1f}"]
        ahead = [r.get(f"full_res_ahead_from_gflops_{k}") for k in ("mse_score", "within_in")]
        ahead = " / ".join("never" if a == "" else a for a in ahead if a is not None)
        cells += [same, "-" if r["iters"].count("-") == 0 or "-0" in r["iters"] else ahead or "-"]
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *(fmt(b) for b in body)])


def plot(curves: dict[str, list[dict]], title: str, path: str, methods: tuple[Method, ...] = METHODS) -> None:
    from matplotlib.figure import Figure

    truth = "within_in" in next(iter(curves.values()))[0]
    panels = [("mse_score", "MSE of relevance maps S vs enumerated", True),
              ("agreement", "agreement with enumerated positions (%)", False)]
    if truth:
        panels += [("agreement_out", "agreement, pixels without a true match (%)", False),
                   ("within_in", "% of pixels with a true match within 2 px of it", False)]
    else:
        panels.insert(1, ("mse_warped", "MSE of warped reference features vs enumerated", True))
    fig = Figure(figsize=(5.3 * len(panels), 9), dpi=90)
    axes = fig.subplots(2, len(panels))
    for m in methods:
        runs = curves[m.name]
        for col, (key, label, log_y) in enumerate(panels):
            for row, xkey in enumerate(("iteration", "gflops")):
                ax = axes[row, col]
                mean_band(ax, runs[0][xkey], [c[key] for c in runs], color=m.colour, ls=m.style, lw=1.6,
                          marker="o", ms=2.5, label=m.name)
                ax.set_ylabel(label, fontsize=9)
                if log_y:
                    ax.set_yscale("log")
    for col in range(len(panels)):
        axes[0, col].set_xlabel("iterations (each iteration counts one, whatever its level: paper's Fig. 5)",
                                fontsize=8)
        axes[1, col].set_xlabel("cumulative analytic GFLOPs (log)", fontsize=9)
        axes[1, col].set_xscale("log")
        for row in range(2):
            axes[row, col].grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)


FEATURES = ("learned", "filter-bank", "filter-bank-4")


def matching_features(kind: str) -> MatchingFeatures:
    """``learned``: :func:`amsa.models.matching_features.default_matching_features`; ``filter-bank``: the
    filter bank at full resolution; ``filter-bank-4``: on the 1/4 grid."""
    if kind == "learned":
        return default_matching_features()
    return MatchingFeatures.filter_bank(stride=4 if kind == "filter-bank-4" else 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plots.convergence", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=None,
                    help="side of the query image and of the reference in pixels (default 384, --quick: 96)")
    ap.add_argument("--seeds", type=parse_ints, default=None,
                    help="comma-separated (default 0,1,2; --quick: 0,1)")
    ap.add_argument("--pairs", default=None, help="comma-separated of demo, coffee, stereo (default all; "
                    "--quick: demo)")
    ap.add_argument("--features", choices=FEATURES, default="learned")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("HR", "REF"),
                    help="also run on this pair of image files (repeatable); each centre-cropped to --size")
    ap.add_argument("--backend", choices=BACKENDS, default="auto")
    ap.add_argument("--quick", action="store_true", help="small run for CI, written to out/plots")
    ap.add_argument("--out", default=None, help="output folder (default plots/figures; --quick: out/plots)")
    args = ap.parse_args(argv)
    size = args.size if args.size is not None else (96 if args.quick else 384)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    names = (args.pairs or ("demo" if args.quick else "demo,coffee,stereo")).split(",")
    if size < 96 or size % 4:
        raise SystemExit(f"--size must be a multiple of 4 and at least 96 (4 levels of 3x3 on the 1/4 grid), "
                         f"got {size}")
    if not seeds:
        raise SystemExit("--seeds must name at least one seed")
    out = output_dir(args.out, args.quick)
    feats = matching_features(args.features)
    pairs = study_pairs(names, size)
    for hr, ref in args.pair:
        name, lr_up, ref_img = user_pair(hr, ref, size)
        pairs.append(StudyPair(name, f"{name} {tuple(lr_up.shape[-2:])} vs {tuple(ref_img.shape[-2:])}",
                               lr_up, ref_img, None))
    for p in pairs:
        stem = "convergence" if p.name == "demo" else f"convergence_{p.name}"
        with torch.no_grad():
            q, r = feats(p.lr_up, p.ref)
        truth, inside = p.truth(feats.stride) if p.ref_of is not None else (None, None)
        extra = "" if inside is None else f", {100 * inside.float().mean():.0f} % of cells with a true match"
        print(f"{p.label}: {feats.name} features C={q.shape[1]} on a {tuple(q.shape[-2:])} grid "
              f"({feats.stride} px per cell){extra}, seeds {seeds}")
        _, curves = run_pair(q, r, seeds, backend=args.backend, truth=truth, inside=inside)
        summary = summary_rows(p.label, curves)
        print(format_summary(summary))
        write_rows(os.path.join(out, f"{stem}.csv"), curve_rows(p.label, seeds, curves))
        write_rows(os.path.join(out, f"{stem}_summary.csv"), summary)
        plot(curves, f"Convergence to enumerated matching, {p.label}, {feats.name} features, "
                     f"{feats.stride} px per grid pixel (mean over seeds {seeds}, band: min-max; every state "
                     "brought to full resolution)", os.path.join(out, f"{stem}.png"))
        print(f"wrote {os.path.join(out, stem)}.png, .csv, _summary.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
