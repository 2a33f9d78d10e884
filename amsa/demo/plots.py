"""The demo's figures: correspondences (paper Fig. 1 style) and convergence curves (cf. Fig. 5)."""

from __future__ import annotations

import torch

from amsa.demo.pair import DemoPair
from amsa.demo.table import TOLERANCE_PX, MethodResult

__all__ = ["plot_convergence", "plot_correspondences"]


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


def _in_pixels(pos: torch.Tensor, stride: int) -> torch.Tensor:
    """Matches [h, w, 2] on a grid of ``stride`` pixels per cell -> [h s, w s, 2] float pixel positions
    (every pixel of a cell takes the cell's match, at the matched cell's centre)."""
    if stride == 1:
        return pos.float()
    return (pos.float() * stride + (stride - 1) / 2).repeat_interleave(stride, 0).repeat_interleave(stride, 1)


def plot_correspondences(pair: DemoPair, pm: MethodResult, enum: MethodResult, path: str, *,
                         stride: int = 1) -> None:
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
    ppos, epos = _in_pixels(pm.match.pos[0].cpu(), stride), _in_pixels(enum.match.pos[0].cpu(), stride)

    def correct(pos, y, x):
        return float((pos[y, x].float() - truth[y, x]).norm()) <= TOLERANCE_PX * stride

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
    tol = f"{TOLERANCE_PX * stride:g} px of the truth"
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


def plot_convergence(curves: dict[str, dict], enum: MethodResult, path: str) -> None:
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
