"""The package's main job (``make demo`` = ``python -m amsa demo``): CFE-PatchMatch on a real RefSR pair.

The pair comes from the photo matplotlib ships (:func:`amsa.images.demo_pair`): the HR crop is
bicubic-downsampled 4x (LR) and upsampled back (LR-up, the query); the reference is an overlapping crop
of the same photo at another scale and position, taken down and up 4x as well (ref-blur), so both sides
are matched in the same blur domain, as RefSR methods do. Features of both come from a fixed extractor
(:class:`amsa.features.FilterBankExtractor` unless another one is given). Then

* CFE-PatchMatch with the paper's schedule (1, 1, 2, 6 iterations at 1/8, 1/4, 1/2, 1),
* CFE-PatchMatch with the official release's schedule (1, 1, 1, 4),
* single-level Embedded PatchMatch (10 iterations at full resolution, the paper's Fig. 5 baseline),
* enumerated matching (exact argmax, the baseline RefSR methods use),

are timed and compared: agreement with the enumerated matches, mean score, analytic FLOPs, speed-up, and
how many matches land within 2 px of the true correspondence (known from the crop geometry).

Outputs in ``out``: ``results.csv`` (the printed table), ``correspondences.png`` (HR crop and reference
side by side, lines between matched points as in the paper's Fig. 1: CFE-PatchMatch red, enumerated
yellow) and ``convergence.png`` (mean score and agreement vs iterations and vs FLOPs, cf. the paper's
Fig. 5).
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import amsa
from amsa.convergence import convergence_curve
from amsa.features import FilterBankExtractor
from amsa.images import DemoPair, demo_pair

__all__ = ["DemoResult", "MethodResult", "convergence_curve", "run_demo"]

PAPER = (1, 1, 2, 6)
OFFICIAL = (1, 1, 1, 4)
SINGLE = (10,)
TOLERANCE_PX = 2.0


@dataclass
class MethodResult:
    """One row of the demo's table."""

    name: str
    iters: tuple[int, ...] | None  # None: enumerated matching
    match: amsa.Match = field(repr=False)
    seconds: float
    gflops: float
    agreement: float  # % of query pixels with the same position as enumerated matching
    mean_score: float
    score_gap: float  # % below the enumerated mean score
    speedup: float  # enumerated time / this time
    flop_cut: float  # enumerated FLOPs / these FLOPs
    within_px: float  # % of overlap pixels within TOLERANCE_PX of the true correspondence


@dataclass
class DemoResult:
    pair: DemoPair = field(repr=False)
    rows: list[MethodResult]
    table: str
    files: dict[str, str]
    feature_seconds: float
    total_seconds: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _format_table(rows: list[MethodResult]) -> str:
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


def _write_csv(rows: list[MethodResult], path: str) -> None:
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


def _cornerness(img: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """Shi-Tomasi cornerness (smaller eigenvalue of the structure tensor) of the luminance of ``img``
    [1, 3, H, W]: high on corners and textured points, low on flat areas and straight edges. -> [H, W]."""
    y = (img[0].float().cpu() * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)
    gy, gx = torch.gradient(y)
    r = max(1, round(3 * sigma))
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    g = (g / g.sum())[None, None]

    def smooth(t):
        t = torch.nn.functional.conv2d(t[None, None], g[..., None], padding=(r, 0))
        return torch.nn.functional.conv2d(t, g[:, :, None, :], padding=(0, r))[0, 0]

    a, b, c = smooth(gx * gx), smooth(gx * gy), smooth(gy * gy)
    return (a + c) / 2 - torch.sqrt(((a - c) / 2) ** 2 + b * b)


def _spread_points(strength: torch.Tensor, n_side: int, border: int) -> list[tuple[int, int]]:
    """One query point per cell of an n_side x n_side grid, away from the border: the cell's maximum of
    ``strength`` (the demo uses the cornerness of the LR-up query image, never the ground truth)."""
    h, w = strength.shape
    pts = []
    ys = torch.linspace(border, h - border, n_side + 1).round().long().tolist()
    xs = torch.linspace(border, w - border, n_side + 1).round().long().tolist()
    for i in range(n_side):
        for j in range(n_side):
            cell = strength[ys[i] : ys[i + 1], xs[j] : xs[j + 1]]
            if cell.numel() == 0:
                continue
            k = int(cell.argmax())
            pts.append((ys[i] + k // cell.shape[1], xs[j] + k % cell.shape[1]))
    return pts


def _to_hwc(img: torch.Tensor):
    return img[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _plot_correspondences(pair: DemoPair, pm: MethodResult, enum: MethodResult, path: str) -> None:
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    hr, ref = _to_hwc(pair.hr), _to_hwc(pair.ref)
    hq, wq = hr.shape[:2]
    hr_, wr = ref.shape[:2]
    gap = max(8, wq // 32)
    canvas = np.ones((max(hq, hr_), wq + gap + wr, 3))
    canvas[:hq, :wq] = hr
    canvas[:hr_, wq + gap :] = ref

    pts = _spread_points(_cornerness(pair.lr_up), n_side=7, border=max(2, wq // 40))
    truth = pair.true_positions()
    ppos, epos = pm.match.pos[0].cpu(), enum.match.pos[0].cpu()

    def correct(pos, y, x):
        return float((pos[y, x].float() - truth[y, x]).norm()) <= TOLERANCE_PX

    fig = Figure(figsize=(12, 6.6), dpi=110)
    ax = fig.add_axes((0.01, 0.10, 0.98, 0.84))
    ax.imshow(canvas, interpolation="nearest")
    # footprint of the HR crop in the reference (the true overlap)
    corners = torch.tensor([[0, 0], [0, wq - 1], [hq - 1, wq - 1], [hq - 1, 0], [0, 0]], dtype=torch.float32)
    fp = pair.geometry.hr_to_ref(corners).numpy()
    ax.plot(fp[:, 1] + wq + gap, fp[:, 0], "--", color="cyan", lw=1.2)
    for y, x in pts:
        ey, ex = epos[y, x].tolist()
        ax.plot([x, ex + wq + gap], [y, ey], "-", color="yellow", lw=2.6, alpha=0.9)
    for y, x in pts:
        py, px = ppos[y, x].tolist()
        ax.plot([x, px + wq + gap], [y, py], "-", color="red", lw=1.1)
        ax.plot([x], [y], "o", ms=3, color="red")
        ax.plot([px + wq + gap], [py], "o", ms=3, color="red")
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
    ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
    ax.axis("off")
    n_pm = sum(correct(ppos, y, x) for y, x in pts)
    n_en = sum(correct(epos, y, x) for y, x in pts)
    tol = f"{TOLERANCE_PX:g} px of the truth"
    handles = [
        Line2D([], [], color="red", lw=1.5, label=f"{pm.name}: {n_pm}/{len(pts)} within {tol}"),
        Line2D([], [], color="yellow", lw=2.6, label=f"{enum.name}: {n_en}/{len(pts)} within {tol}"),
        Line2D([], [], color="cyan", ls="--", label="true footprint of the HR crop"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.suptitle(
        f"Correspondences: HR crop {wq}x{hq} (left, matched via its 4x bicubic LR-up) vs reference "
        f"{wr}x{hr_} (right, scale {pair.ref_scale:g}); one point per grid cell: its strongest corner",
        fontsize=10,
    )
    fig.savefig(path)


def _plot_convergence(curves: dict[str, dict], enum: MethodResult, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.4), dpi=100)
    axes = fig.subplots(1, 3)
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    for (name, c), col in zip(curves.items(), colours):
        axes[0].plot(c["iteration"], c["mean_score"], "o-", color=col, ms=3.5, label=name)
        axes[1].plot(c["iteration"], c["agreement"], "o-", color=col, ms=3.5, label=name)
        axes[2].plot(c["gflops"], c["agreement"], "o-", color=col, ms=3.5, label=name)
        # level boundaries: first snapshot of each finer level
        lv = c["level"]
        marks = [i for i in range(1, len(lv)) if lv[i] != lv[i - 1]]
        for ax, key in ((axes[0], "mean_score"), (axes[1], "agreement")):
            xs, ys = [c["iteration"][i] for i in marks], [c[key][i] for i in marks]
            ax.plot(xs, ys, "s", mfc="none", mec=col, ms=8)
    gold = "goldenrod"
    axes[0].axhline(enum.mean_score, color=gold, ls="--", label=f"enumerated ({enum.mean_score:.4f})")
    axes[1].axhline(100.0, color=gold, ls="--", label="enumerated")
    axes[2].plot(
        [enum.gflops], [100.0], "*", color=gold, ms=14, label=f"enumerated ({enum.gflops:.1f} GFLOPs)"
    )
    axes[2].set_xscale("log")
    axes[0].set_ylabel("mean patch cosine at full resolution")
    axes[1].set_ylabel("agreement with enumerated (% of pixels)")
    axes[2].set_ylabel("agreement with enumerated (% of pixels)")
    for ax in axes[:2]:
        ax.set_xlabel("iterations (a coarse-level iteration counts as one; squares: entering a finer level)")
        ax.xaxis.label.set_fontsize(8)
    axes[2].set_xlabel("cumulative analytic GFLOPs (log)")
    for ax, loc in zip(axes, ("lower right", "lower right", "upper left")):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc=loc)
    fig.suptitle("Convergence of CFE-PatchMatch (each state brought up to full resolution and scored there)")
    fig.tight_layout()
    fig.savefig(path)


def run_demo(
    out: str | os.PathLike = "out/demo",
    size: int = 256,
    *,
    backend: str = "auto",
    seed: int = 0,
    extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = print,
) -> DemoResult:
    """Run the demo at ``size x size`` (HR crop and reference) and write its outputs to ``out``.

    ``extractor`` maps images ``[1, 3, H, W]`` in ``[0, 1]`` to features ``[1, C, H, W]`` (default:
    :class:`~amsa.features.FilterBankExtractor`). ``backend`` and ``seed`` go to
    :func:`amsa.cfe_patchmatch`. ``device`` defaults to CUDA when available. ``log`` receives the
    printed lines (``None``: silent). Returns the table rows, the table text and the written files.
    """
    t_start = time.perf_counter()
    say = log if log is not None else (lambda s: None)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    extractor = FilterBankExtractor() if extractor is None else extractor
    if isinstance(extractor, torch.nn.Module):
        extractor = extractor.to(dev).eval()

    pair = demo_pair(size)
    lr_up, ref_blur = pair.lr_up.to(dev), pair.ref_blur.to(dev)
    with torch.no_grad():
        (q, r), t_feat = _timed(lambda: (extractor(lr_up), extractor(ref_blur)), dev)
    if q.dim() != 4 or q.shape[-2:] != pair.lr_up.shape[-2:] or r.shape[-2:] != pair.ref_blur.shape[-2:]:
        raise ValueError(f"extractor must keep the input resolution, got {list(q.shape)} and {list(r.shape)}")
    name = type(extractor).__name__
    gy, gx = pair.geometry.scale
    overlap = pair.overlap_mask()
    say(
        f"amsa demo: {os.path.basename(pair.source)}, HR crop {size}x{size} at {pair.hr_origin}, "
        f"LR {size // 4}x{size // 4} (4x bicubic), reference {tuple(pair.ref.shape[-2:])} at scale "
        f"{gy:.3f}x{gx:.3f}, "
        f"{100 * overlap.float().mean():.0f}% of HR pixels inside it"
    )
    say(
        f"features: {name}, C={q.shape[1]}, query LR-up {tuple(q.shape[-2:])} vs reference down-up "
        f"{tuple(r.shape[-2:])}, {t_feat:.2f} s; device {dev}, backend {backend}, seed {seed}, "
        f"torch threads {torch.get_num_threads()}"
    )

    # warm-up on a small crop (24x24: the smallest map 4 levels allow) so one-time set-up is not timed
    w = 24
    amsa.cfe_patchmatch(q[..., :w, :w], r[..., :w, :w], PAPER, seed=seed, backend=backend)
    amsa.enumerated_match(q[..., :w, :w], r[..., :w, :w])

    exact, t_enum = _timed(lambda: amsa.enumerated_match(q, r), dev)
    truth = pair.true_positions().to(dev)

    def within(m: amsa.Match) -> float:
        d = (m.pos[0].float() - truth).norm(dim=-1)
        return 100.0 * (d[overlap.to(dev)] <= TOLERANCE_PX).float().mean().item()

    enum_flops = exact.flops
    enum_mean = exact.score.mean().item()
    methods = [
        ("CFE-PatchMatch paper", PAPER),
        ("CFE-PatchMatch official", OFFICIAL),
        ("Embedded PatchMatch 1-level", SINGLE),
    ]
    rows: list[MethodResult] = []
    curves: dict[str, dict] = {}
    for label, iters in methods:
        run = lambda iters=iters: amsa.cfe_patchmatch(q, r, iters, seed=seed, backend=backend, history=True)
        m, t = _timed(run, dev)
        mean = m.score.mean().item()
        rows.append(
            MethodResult(
                name=f"{label} {'-'.join(map(str, iters))}",
                iters=iters,
                match=m,
                seconds=t,
                gflops=m.flops / 1e9,
                agreement=100.0 * (m.pos == exact.pos).all(-1).float().mean().item(),
                mean_score=mean,
                score_gap=100.0 * (enum_mean - mean) / abs(enum_mean) if enum_mean else 0.0,
                speedup=t_enum / t if t > 0 else float("inf"),
                flop_cut=enum_flops / m.flops if m.flops else float("inf"),
                within_px=within(m),
            )
        )
        curves[rows[-1].name] = convergence_curve(m, q, r, exact)
    enum_row = MethodResult(
        name="Enumerated matching",
        iters=None,
        match=exact,
        seconds=t_enum,
        gflops=enum_flops / 1e9,
        agreement=100.0,
        mean_score=enum_mean,
        score_gap=0.0,
        speedup=1.0,
        flop_cut=1.0,
        within_px=within(exact),
    )
    rows.append(enum_row)

    table = _format_table(rows)
    say("")
    say(table)
    say(
        f"\nagreement: % of the {size}x{size} query pixels matched to the same reference pixel as enumerated "
        f"matching; within {TOLERANCE_PX:g} px: % of the {int(overlap.sum())} HR pixels whose true "
        f"reference position is inside the reference; GFLOPs: analytic, matching only"
    )

    files = {
        "results": os.path.join(out, "results.csv"),
        "correspondences": os.path.join(out, "correspondences.png"),
        "convergence": os.path.join(out, "convergence.png"),
    }
    _write_csv(rows, files["results"])
    _plot_correspondences(pair, rows[0], enum_row, files["correspondences"])
    _plot_convergence(curves, enum_row, files["convergence"])
    total = time.perf_counter() - t_start
    say(f"wrote {', '.join(files.values())} ({total:.1f} s in all)")
    return DemoResult(pair, rows, table, files, feature_seconds=t_feat, total_seconds=total)
