"""The demo's results table: one :class:`MethodResult` per matcher, printed and written as CSV."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

from amsa.matching import Match

__all__ = ["TOLERANCE_PX", "MethodResult", "format_table", "write_csv"]

TOLERANCE_PX = 2.0  # a match is correct within this distance of the true correspondence


@dataclass
class MethodResult:
    """One row of the demo's table."""

    name: str
    iters: tuple[int, ...] | None  # None: enumerated matching
    match: Match = field(repr=False)
    seconds: float
    gflops: float
    agreement: float  # % of query pixels with the same position as enumerated matching
    mean_score: float
    score_gap: float  # % below the enumerated mean score
    speedup: float  # enumerated time / this time
    flop_cut: float  # enumerated FLOPs / these FLOPs
    within_px: float  # % of overlap pixels within TOLERANCE_PX of the true correspondence


def format_table(rows: list[MethodResult]) -> str:
    head = [
        "method",
        "time (s)",
        "GFLOPs",
        "agree w/ enum (%)",
        "mean score",
        "score gap (%)",
        "speed-up",
        "FLOPs / enum",
        f"within {TOLERANCE_PX:g} px (%)",
    ]
    body = [
        [
            r.name,
            f"{r.seconds:.3f}",
            f"{r.gflops:.2f}",
            f"{r.agreement:.1f}",
            f"{r.mean_score:.4f}",
            f"{r.score_gap:.2f}",
            f"{r.speedup:.1f}x",
            "1" if r.flop_cut == 1 else f"1/{r.flop_cut:.0f}" if r.flop_cut >= 10 else f"1/{r.flop_cut:.2f}",
            f"{r.within_px:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells):
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def write_csv(rows: list[MethodResult], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "method",
                "iters",
                "time_s",
                "gflops",
                "agreement_pct",
                "mean_score",
                "score_gap_pct",
                "speedup",
                "flop_reduction",
                f"within_{TOLERANCE_PX:g}px_pct",
            ]
        )
        for r in rows:
            w.writerow(
                [
                    r.name,
                    "" if r.iters is None else "-".join(map(str, r.iters)),
                    f"{r.seconds:.4f}",
                    f"{r.gflops:.4f}",
                    f"{r.agreement:.3f}",
                    f"{r.mean_score:.6f}",
                    f"{r.score_gap:.4f}",
                    f"{r.speedup:.3f}",
                    f"{r.flop_cut:.3f}",
                    f"{r.within_px:.3f}",
                ]
            )
