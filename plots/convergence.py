"""The paper's Fig. 5: convergence of (CFE-)PatchMatch to enumerated matching, on real images.

``python -m plots.convergence`` matches the demo pair (:func:`amsa.demo.pair.demo_pair`: LR-up of an HR crop
of matplotlib's photo against a rescaled, shifted reference, both in the 4x down-up blur domain, on the
:class:`amsa.demo.features.FilterBankExtractor` features) with

* Embedded PatchMatch on a single level, 1/8, 1/4, 1/2 or full resolution, 10 iterations (iters
  ``(10, 0, 0, 0)`` .. ``(10,)``: zero iterations only pass the result up),
* CFE-PatchMatch with the paper's schedule 1-1-2-6 and the official release's 1-1-1-4, each in the
  paper's propagation form and offset-corrected,

for several seeds, and compares every iteration's state, brought to full resolution, with enumerated
matching on the same features (:mod:`amsa.demo.convergence` defines the MSEs and both iteration counts).
Writes ``convergence.png`` (MSE of the relevance maps S, MSE of the warped reference features and
agreement, against iterations and against cumulative FLOPs; mean over seeds, min-max band),
``convergence.csv`` (every curve point of every seed) and ``convergence_summary.csv`` (final values per
schedule, and single-level full-resolution PatchMatch at CFE's final FLOP count). ``--pair HR REF`` adds a
pair of your own (files named after it). ``--quick``: 64x64, two seeds, to ``out/plots``.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch

import amsa
from amsa.backends import BACKENDS
from amsa.demo.convergence import CURVE_KEYS, convergence_curve, value_at
from amsa.demo.features import FilterBankExtractor
from amsa.demo.pair import demo_pair
from plots._common import features, mean_band, output_dir, parse_ints, user_pair, write_csv


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
             methods: tuple[Method, ...] = METHODS, log=print) -> tuple[amsa.Match, dict[str, list[dict]]]:
    """Enumerated matching once, then every method for every seed with ``history=True``; returns the
    enumerated match and, per method name, one :func:`amsa.demo.convergence.convergence_curve` per seed."""
    t0 = time.perf_counter()
    exact = amsa.enumerated_match(query, ref)
    log(f"  enumerated matching: {exact.flops / 1e9:.1f} GFLOPs, {time.perf_counter() - t0:.1f} s")
    curves: dict[str, list[dict]] = {}
    for m in methods:
        t0 = time.perf_counter()
        curves[m.name] = [
            convergence_curve(amsa.cfe_patchmatch(query, ref, m.iters, seed=s, backend=backend, history=True,
                                                  offset_corrected=m.offset_corrected), query, ref, exact)
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
                             **{k: c[k][i] for k in CURVE_KEYS}})
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
        for key in ("mse_score", "mse_warped", "agreement", "mean_score"):
            mean, lo, hi = _stats([c[key][-1] for c in runs])
            row.update({f"{key}_mean": f"{mean:.6g}", f"{key}_min": f"{lo:.6g}", f"{key}_max": f"{hi:.6g}"})
        base, final = curves.get(baseline.name), runs[0]["gflops"][-1]
        for key in ("mse_score", "agreement"):
            at = ""
            if base is not None and base[0]["gflops"][0] <= final <= base[0]["gflops"][-1]:
                at = f"{_stats([value_at(b['gflops'], b[key], final) for b in base])[0]:.6g}"
            row[f"full_res_{key}_at_same_flops"] = at
        rows.append(row)
    return rows


def format_summary(rows: list[dict]) -> str:
    head = ("method", "GFLOPs", "full-res its", "MSE(S)", "MSE(warped)", "agreement %",
            "1-level full at same FLOPs: MSE(S), agr. %")
    body = []
    for r in rows:
        same = "-"
        if r["full_res_mse_score_at_same_flops"]:
            same = (f"{float(r['full_res_mse_score_at_same_flops']):.3g}, "
                    f"{float(r['full_res_agreement_at_same_flops']):.1f}")
        body.append((r["method"], f"{r['gflops']:.2f}", f"{r['full_res_iters']:.2f}",
                     f"{float(r['mse_score_mean']):.3g}", f"{float(r['mse_warped_mean']):.3g}",
                     f"{float(r['agreement_mean']):.1f} ({float(r['agreement_min']):.1f}-"
                     f"{float(r['agreement_max']):.1f})", same))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *(fmt(b) for b in body)])


def plot(curves: dict[str, list[dict]], title: str, path: str, methods: tuple[Method, ...] = METHODS) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 9), dpi=90)
    axes = fig.subplots(2, 3)
    panels = (("mse_score", "MSE of relevance maps S vs enumerated", True),
              ("mse_warped", "MSE of warped reference features vs enumerated", True),
              ("agreement", "agreement with enumerated positions (%)", False))
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
    for col in range(3):
        axes[0, col].set_xlabel("iterations (each iteration counts one, whatever its level: paper's Fig. 5)",
                                fontsize=8)
        axes[1, col].set_xlabel("cumulative analytic GFLOPs (log)", fontsize=9)
        axes[1, col].set_xscale("log")
        for row in range(2):
            axes[row, col].grid(alpha=0.3)
    axes[0, 2].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plots.convergence", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=None, help="demo pair size (default 256, --quick: 64)")
    ap.add_argument("--seeds", type=parse_ints, default=None,
                    help="comma-separated (default 0,1,2; --quick: 0,1)")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("HR", "REF"),
                    help="also run on this pair of image files (repeatable); each centre-cropped to --size")
    ap.add_argument("--backend", choices=BACKENDS, default="auto")
    ap.add_argument("--quick", action="store_true", help="small run for CI, written to out/plots")
    ap.add_argument("--out", default=None, help="output folder (default plots/figures; --quick: out/plots)")
    args = ap.parse_args(argv)
    size = args.size if args.size is not None else (64 if args.quick else 256)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    if size < 24 or size % 4:
        raise SystemExit(f"--size must be a multiple of 4 and at least 24 (4 levels of 3x3), got {size}")
    if not seeds:
        raise SystemExit("--seeds must name at least one seed")
    out = output_dir(args.out, args.quick)
    extractor = FilterBankExtractor()
    demo = demo_pair(size)
    pairs = [("convergence", f"demo pair {size}x{size}", demo.lr_up, demo.ref_blur)]
    for hr, ref in args.pair:
        name, lr_up, ref_blur = user_pair(hr, ref, size)
        label = f"{name} {tuple(lr_up.shape[-2:])} vs {tuple(ref_blur.shape[-2:])}"
        pairs.append((f"convergence_{name}", label, lr_up, ref_blur))
    for stem, label, lr_up, ref_blur in pairs:
        q, r = features(extractor, lr_up, ref_blur)
        print(f"{label}: {type(extractor).__name__} features C={q.shape[1]}, seeds {seeds}")
        _, curves = run_pair(q, r, seeds, backend=args.backend)
        summary = summary_rows(label, curves)
        print(format_summary(summary))
        write_csv(os.path.join(out, f"{stem}.csv"), curve_rows(label, seeds, curves))
        write_csv(os.path.join(out, f"{stem}_summary.csv"), summary)
        plot(curves, f"Convergence to enumerated matching, {label}, {type(extractor).__name__} features "
                     f"(mean over seeds {seeds}, band: min-max; every state brought to full resolution)",
             os.path.join(out, f"{stem}.png"))
        print(f"wrote {os.path.join(out, stem)}.png, .csv, _summary.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
