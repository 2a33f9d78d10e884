"""The paper's Fig. 7 for matching: robustness to scale misalignment between LR and reference.

For each scale ratio rho (the reference's scale relative to the HR image; the paper's gamma = 4 rho is the
scale difference between the 4x LR image and the reference), the demo pair is rebuilt with the reference
cut from the photo rescaled by rho (:func:`amsa.demo.pair.demo_pair` with ``ref_scale=rho`` and its default
shift of the window, so the two crops overlap partly, with exactly known geometry). The LR-up query is
matched with CFE-PatchMatch (paper schedule 1-1-2-6) against

* the single reference (``Ref_0``), and
* the n = 5 multi-scale references ``Ref_i = Ref_0`` bicubic-downscaled by k^i, k = 0.8 (paper section 3),
  keeping for every query pixel the reference with the best score (the Multi-Scale Aggregation weights
  the scales by their scores, Eq. 9-10),

every reference taken 4x down and up (the blur domain of LR-up, as in the demo), on the
:class:`amsa.models.matching_features.FilterBankExtractor` features. Matching quality, over the query
pixels whose true correspondence lies inside the reference:

* ``within_px``: % whose match lies within 2 pixels of the true correspondence, measured in the pixels
  of the reference the match was taken from (the grid the aggregation samples);
* ``mean_score``: mean cosine of the kept match (S; for multi-scale the best over scales);
* ``chosen_scale``: geometric mean of the kept reference's scale relative to HR, rho * k^i.

A reference scale rho > 1 is made by enlarging the photo. In the blur domain that is no limitation for
rho <= 4: the 4x down-up reference at scale rho keeps the photo's frequencies up to rho/4 of its Nyquist
limit, all of which the photo has. Writes ``scale_robustness.png`` and ``.csv`` (one row per ratio,
seed and variant). ``--quick``: 64x64, three ratios, to ``out/plots``.

Fig. 7 in SR PSNR: with ``--weights restoration.pth`` (and ``--feature-weights``, ``--vgg-weights``, as
:class:`amsa.AMSA` takes them) the HR crop is also super-resolved from its 4x LR with the (sharp)
reference, by AMSA with one reference scale and with n = 5, and the Y-channel PSNR (border 4) against the
HR crop is added (``psnr`` rows, a fourth panel). No trained weights are available offline, so the
committed figure covers matching only.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

import amsa
from amsa.backends import BACKENDS
from amsa.demo.pair import demo_pair
from amsa.io import bicubic_resize, load_image, sample_photo_path
from amsa.models.matching_features import FilterBankExtractor
from bench.common import write_rows
from plots._common import down_up, features, mean_band, output_dir, parse_floats, parse_ints

N_SCALES, K = 5, 0.8  # the paper's n multi-scale references, each k times the previous one
PAPER = (1, 1, 2, 6)
TOLERANCE_PX = 2.0
RATIOS = (2.0, 1.6, 1.25, 1.0, 0.8, 0.64, 0.5, 0.35, 0.25)


def multi_scale(ref: torch.Tensor, n: int = N_SCALES, k: float = K) -> list[torch.Tensor]:
    """The n references Ref_i = ``ref`` [1, 3, H, W] bicubic-downscaled by k^i, i = 0..n-1 (sizes
    rounded), each taken 4x down and up (the matcher's blur domain)."""
    return [down_up(ref if i == 0 else bicubic_resize(ref, scale=k**i)) for i in range(n)]


def truth_in(truth: torch.Tensor, size_from: tuple[int, int], size_to: tuple[int, int]) -> torch.Tensor:
    """True positions [H, W, 2] (pixel-index units) in a reference of ``size_from`` -> in the same image
    resized to ``size_to``: (p + 0.5) * size_to / size_from - 0.5 per axis."""
    s = torch.tensor([size_to[0] / size_from[0], size_to[1] / size_from[1]], dtype=truth.dtype)
    return (truth + 0.5) * s - 0.5


def _ref_size(rho: float, size: int) -> int:
    """The reference's side: ``size``, or less where the photo rescaled by rho is smaller."""
    photo_side = min(load_image(sample_photo_path()).shape[-2:])
    return min(size, int(photo_side * rho) // 4 * 4)


def study_ratio(rho: float, size: int, seeds: list[int], extractor, *, backend: str = "auto") -> list[dict]:
    """Match one scale ratio; one CSV row per seed and variant (single-scale, multi-scale)."""
    pair = demo_pair(size, ref_size=_ref_size(rho, size), ref_scale=rho)
    refs = multi_scale(pair.ref)
    sizes = [tuple(r.shape[-2:]) for r in refs]
    q, *rs = features(extractor, pair.lr_up, *refs)
    mask = pair.overlap_mask()
    truth = pair.true_positions()
    truths = torch.stack([truth_in(truth, sizes[0], s) for s in sizes])  # [n, H, W, 2] in Ref_i pixels
    # each reference's scale relative to HR, from the actual (rounded) sizes
    scales = torch.tensor([pair.geometry.scale[0] * s[0] / sizes[0][0] for s in sizes], dtype=torch.float64)
    rows = []
    for seed in seeds:
        ms = amsa.cfe_patchmatch(q, rs, PAPER, seed=seed, backend=backend)
        score = torch.stack([m.score[0] for m in ms])  # [n, H, W]
        err = (torch.stack([m.pos[0] for m in ms]).float() - truths).norm(dim=-1)  # [n, H, W] in Ref_i px
        for variant, pick in (("single-scale", torch.zeros_like(score[0], dtype=torch.long)),
                              (f"multi-scale n={len(refs)} k={K:g}", score.argmax(0))):
            s = score.gather(0, pick[None])[0][mask]
            e = err.gather(0, pick[None])[0][mask]
            rows.append({"rho": rho, "gamma": 4 * rho, "ref_scale_actual": round(pair.geometry.scale[0], 5),
                         "variant": variant, "seed": seed, "overlap_pixels": int(mask.sum()),
                         "within_px": 100.0 * (e <= TOLERANCE_PX).double().mean().item(),
                         "mean_score": s.double().mean().item(),
                         "chosen_scale": math.exp(scales.log()[pick[mask]].mean().item())})
    return rows


def sr_psnr(model, rho: float, size: int) -> list[dict]:
    """Fig. 7 proper: PSNR of AMSA's 4x SR of the HR crop with a reference at scale ``rho``, using one
    reference scale and the model's n scales (``model.ref_scales`` is set for each, then restored)."""
    from amsa.evaluation.evaluate import super_resolve
    from amsa.evaluation.metrics import psnr

    pair = demo_pair(size, ref_scale=rho, ref_size=_ref_size(rho, size))
    n = model.ref_scales
    rows = []
    try:
        for variant, scales in (("single-scale", 1), (f"multi-scale n={n} k={model.scale_factor:g}", n)):
            model.ref_scales = scales
            sr = super_resolve(model, pair.lr, pair.ref)
            rows.append({"rho": rho, "gamma": 4 * rho, "variant": variant,
                         "psnr": float(psnr(sr, pair.hr).mean())})
    finally:
        model.ref_scales = n
    return rows


def plot(rows: list[dict], path: str, size: int, psnr_rows: list[dict] | None = None) -> None:
    from matplotlib.figure import Figure

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig = Figure(figsize=(20 if psnr_rows else 15, 4.6), dpi=90)
    axes = fig.subplots(1, 4 if psnr_rows else 3)
    if psnr_rows:
        for variant, colour in zip(dict.fromkeys(r["variant"] for r in psnr_rows), ("tab:blue", "tab:red")):
            mine = sorted((r["gamma"], r["psnr"]) for r in psnr_rows if r["variant"] == variant)
            axes[3].plot([g for g, _ in mine], [p for _, p in mine], "o-", color=colour,
                         label=f"AMSA {variant}")
        axes[3].set_ylabel("SR PSNR (Y, dB) of the HR crop", fontsize=9)
        axes[3].legend(fontsize=8)
    panels = (("within_px", f"% of overlap pixels matched within {TOLERANCE_PX:g} px of the truth"),
              ("mean_score", "mean cosine of the kept match (overlap pixels)"),
              ("chosen_scale", "scale of the kept reference / HR scale (geo. mean)"))
    for variant, colour in zip(variants, ("tab:blue", "tab:red")):
        mine = [r for r in rows if r["variant"] == variant]
        gammas = sorted({r["gamma"] for r in mine})
        seeds = sorted({r["seed"] for r in mine})
        for ax, (key, label) in zip(axes, panels):
            runs = [[next(r[key] for r in mine if r["gamma"] == g and r["seed"] == s) for g in gammas]
                    for s in seeds]
            mean_band(ax, gammas, runs, color=colour, marker="o", ms=4, label=variant)
            ax.set_ylabel(label, fontsize=9)
    axes[2].axhline(1.0, color="grey", ls=":", lw=1, label="HR scale")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("gamma = 4 x reference scale / HR scale (4: reference at the HR's scale)", fontsize=8)
        ax.axvline(4.0, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log", base=2)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Scale misalignment: CFE-PatchMatch 1-1-2-6 on the demo pair ({size}x{size} HR crop), "
                 f"single reference vs {N_SCALES} references scaled by {K:g}^i (best score kept)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plots.scale_robustness",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=None, help="HR crop size (default 128, --quick: 64)")
    ap.add_argument("--ratios", type=parse_floats, default=None,
                    help=f"reference scales rho in [0.25, 4] (default {','.join(map(str, RATIOS))})")
    ap.add_argument("--seeds", type=parse_ints, default=None,
                    help="comma-separated (default 0)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto")
    ap.add_argument("--weights", default=None, help="AMSA restoration weights: adds SR PSNR (Fig. 7 proper)")
    ap.add_argument("--feature-weights", default=None, help="with --weights: matching extractor weights")
    ap.add_argument("--vgg-weights", default=None, help="with --weights: VGG19 weights")
    ap.add_argument("--quick", action="store_true", help="small run for CI, written to out/plots")
    ap.add_argument("--out", default=None, help="output folder (default plots/figures; --quick: out/plots)")
    args = ap.parse_args(argv)
    size = args.size if args.size is not None else (64 if args.quick else 128)
    ratios = args.ratios if args.ratios is not None else ([1.6, 1.0, 0.5] if args.quick else list(RATIOS))
    seeds = args.seeds if args.seeds is not None else [0]
    if size < 64 or size % 4:  # the smallest reference, 0.8^4 of it, must allow 4 levels (24 pixels)
        raise SystemExit(f"--size must be a multiple of 4 and at least 64, got {size}")
    if not ratios or not all(0.25 <= r <= 4.0 for r in ratios):
        raise SystemExit(f"--ratios must lie in [0.25, 4], got {ratios}")
    if not seeds:
        raise SystemExit("--seeds must name at least one seed")
    if args.weights is not None and size < 96:
        raise SystemExit(f"--weights: AMSA needs references of at least 96 pixels: --size >= 96, got {size}")
    out = output_dir(args.out, args.quick)
    extractor = FilterBankExtractor()
    model = None
    if args.weights is not None:
        model = amsa.AMSA(weights=args.weights, feature_weights=args.feature_weights,
                          vgg_weights=args.vgg_weights, backend=args.backend).eval()
    psnr_rows: list[dict] = []
    rows = []
    for rho in ratios:
        t0 = time.perf_counter()
        new = study_ratio(rho, size, seeds, extractor, backend=args.backend)
        rows += new
        line = ", ".join(f"{r['variant']}: {r['within_px']:.1f} % within, S {r['mean_score']:.4f}, "
                         f"scale {r['chosen_scale']:.2f}" for r in new if r["seed"] == seeds[0])
        if model is not None:
            psnr_rows += sr_psnr(model, rho, size)
            line += ", SR PSNR " + ", ".join(f"{r['variant']}: {r['psnr']:.2f} dB" for r in psnr_rows[-2:])
        print(f"rho {rho:g} (gamma {4 * rho:g}): {line} ({time.perf_counter() - t0:.1f} s)")
    write_rows(os.path.join(out, "scale_robustness.csv"), rows)
    if psnr_rows:
        write_rows(os.path.join(out, "scale_robustness_psnr.csv"), psnr_rows)
    plot(rows, os.path.join(out, "scale_robustness.png"), size, psnr_rows)
    print(f"wrote {os.path.join(out, 'scale_robustness')}.png, .csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
