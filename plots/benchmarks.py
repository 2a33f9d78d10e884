"""Figures and tables from ``bench/results/results.csv``: matching time vs size (log-log) and a
Table-2-style summary (GFLOPs, time, speed-up, quality per matcher), plus the step, deformable-op and
model rows. The latest row of each (device, configuration, implementation) is used.

    python -m plots.benchmarks [--csv bench/results/results.csv] [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from bench.common import RESULTS, RESULTS_CSV, read_rows

MATCH_KEY = ("device", "data", "channels", "refs", "batch", "height", "iters", "offset_corrected")


def latest(rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    """The last row (file order = time order) for each value of ``key`` + impl + mode + dtype."""
    out: dict[tuple, dict] = {}
    for r in rows:
        out[tuple(r[k] for k in key) + (r["impl"], r["mode"], r["dtype"])] = r
    return list(out.values())


def matching_rows(rows: list[dict]) -> list[dict]:
    ok = [r for r in rows if r["bench"] == "matching" and r["status"] == "ok"]
    # The PatchMatch rows of a configuration differ by iters; compare enumerated rows with every schedule.
    return latest(ok, MATCH_KEY)


def plot_time_vs_size(rows: list[dict], path: Path) -> bool:
    """One panel per (device, C, refs, batch) of the random-data sweep: p50 vs H = W, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in matching_rows(rows) if r["data"] == "random" and r["iters"] in ("", "1-1-2-6")
             and r["offset_corrected"] in ("", "0")]
    panels: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in sweep:
        panels[(r["device"], r["channels"], r["refs"], r["batch"])][r["impl"]].append(
            (int(r["height"]), float(r["p50_ms"]), float(r["p20_ms"]), float(r["p80_ms"])))
    panels = {k: v for k, v in panels.items() if max(len(p) for p in v.values()) > 1}
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, ((device, C, refs, batch), impls) in zip(axes[0], sorted(panels.items())):
        for impl, pts in sorted(impls.items()):
            pts.sort()
            x = [p[0] for p in pts]
            ax.errorbar(x, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                        marker="o", ms=3, capsize=2, label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("H = W of query and reference maps")
        ax.set_ylabel("time per call, ms (median, 20-80 %)")
        ax.set_title(f"{device}\nC={C}, refs={refs}, batch={batch}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _f(x: str, fmt: str) -> str:
    return format(float(x), fmt) if x not in ("", "nan") else "-"


def summary(rows: list[dict]) -> str:
    """Markdown: per matching configuration, every matcher's GFLOPs, time, speed-up of CFE-PatchMatch
    over it, agreement and score gap with exact enumerated matching; then step, deformable op, model."""
    out = []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in matching_rows(rows):
        groups[tuple(r[k] for k in MATCH_KEY[:-2])].append(r)
    for (device, data, C, refs, batch, size), rs in sorted(groups.items()):
        cfe = {r["iters"] + "/" + r["offset_corrected"]: r for r in rs
               if r["impl"].startswith("cfe_patchmatch") and r["impl"].endswith("triton")} or \
              {r["iters"] + "/" + r["offset_corrected"]: r for r in rs if r["impl"] == "cfe_patchmatch/torch"}
        ref = cfe.get("1-1-2-6/0") or next(iter(cfe.values()), None)
        out.append(f"\n**{device}**, {data} features, {size}x{size}, C = {C}, refs = {refs}, batch = {batch}"
                   + (f" (speed-up of `{ref['impl']}` {ref['iters']})" if ref else "") + "\n")
        out.append("| matcher | iters | time ms (p50, 20-80 %) | peak MB | GFLOPs | speed-up | agreement % "
                   "| mean score | gap % |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(rs, key=lambda r: float(r["p50_ms"])):
            speed = f"{float(r['p50_ms']) / float(ref['p50_ms']):.1f}x" if ref else "-"
            oc = " (offset-corr.)" if r["offset_corrected"] == "1" else ""
            out.append(f"| `{r['impl']}` | {r['iters'] or '-'}{oc} | {_f(r['p50_ms'], '.3f')} "
                       f"({_f(r['p20_ms'], '.3f')}-{_f(r['p80_ms'], '.3f')}) | {r['peak_mem_mb'] or 'n/a'} | "
                       f"{_f(r['gflops'], '.2f')} | {speed} | {_f(r['agreement_pct'], '.2f')} | "
                       f"{_f(r['mean_score'], '.5f')} | {_f(r['score_gap_pct'], '.4f')} |")
    skipped = [r for r in rows if r["status"] in ("skipped", "oom")]
    if skipped:
        out.append(f"\n{len(skipped)} rows skipped or out of memory (see `status`/`note` in the CSV).")
    other = [r for r in rows if r["bench"] in ("step", "deform_conv", "model") and r["status"] == "ok"]
    other = latest(other, ("bench", "device", "batch", "channels", "height", "offset_groups"))
    if other:
        out.append("\n| bench | impl | mode | dtype | B, C, H, G | p50 ms (20-80 %) | device |")
        out.append("|---|---|---|---|---|---|---|")
        for r in other:
            shape = f"{r['batch']}, {r['channels']}, {r['height']}, {r['offset_groups'] or '-'}"
            out.append(f"| {r['bench']} | `{r['impl']}` | {r['mode'] or '-'} | {r['dtype']} | {shape} | "
                       f"{_f(r['p50_ms'], '.3f')} ({_f(r['p20_ms'], '.3f')}-{_f(r['p80_ms'], '.3f')}) | "
                       f"{r['device']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", default=str(RESULTS_CSV))
    p.add_argument("--out", default=str(RESULTS), help="folder for matching_time.png and summary.md")
    args = p.parse_args(argv)
    rows = read_rows(Path(args.csv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = summary(rows)
    (out / "summary.md").write_text(text)
    print(text)
    if plot_time_vs_size(rows, out / "matching_time.png"):
        print(f"wrote {out / 'matching_time.png'}")
    else:
        print("no size sweep in the CSV yet: no time-vs-size plot")
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
