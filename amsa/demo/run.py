"""The package's main job (``make demo`` = ``python -m amsa demo``): CFE-PatchMatch on a real RefSR pair.

The pair comes from the photo matplotlib ships (:func:`amsa.demo.pair.demo_pair`): the HR crop is
bicubic-downsampled 4x (LR) and upsampled back (LR-up, the query); the reference is an overlapping crop
of the same photo at another scale and position, taken down and up 4x as well (ref-blur), so both sides
are matched in the same blur domain, as RefSR methods do. Features come from
:func:`amsa.models.matching_features.default_matching_features` unless others are given: the matching
extractor trained in this repository (its LR branch on LR-up, its reference branch on the sharp reference,
as AMSA matches, on the 1/4 grid), or the fixed filter bank (both in the blur domain, full resolution).
Then

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

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from amsa.demo.convergence import convergence_curve
from amsa.demo.pair import DemoPair, demo_pair
from amsa.demo.plots import plot_convergence, plot_correspondences
from amsa.demo.table import TOLERANCE_PX, MethodResult, format_table, write_csv
from amsa.matching import Match, cfe_patchmatch, enumerated_match
from amsa.models.matching_features import MatchingFeatures, default_matching_features
from amsa.timing import timed

__all__ = ["DemoResult", "run_demo"]

PAPER = (1, 1, 2, 6)
OFFICIAL = (1, 1, 1, 4)
SINGLE = (10,)


@dataclass
class DemoResult:
    pair: DemoPair = field(repr=False)
    rows: list[MethodResult]
    table: str
    files: dict[str, str]
    feature_seconds: float
    total_seconds: float


def run_demo(
    out: str | os.PathLike = "out/demo",
    size: int = 256,
    *,
    backend: str = "auto",
    seed: int = 0,
    extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    features: MatchingFeatures | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = print,
) -> DemoResult:
    """Run the demo at ``size x size`` (HR crop and reference) and write its outputs to ``out``.

    Features: ``features`` (a :class:`~amsa.models.matching_features.MatchingFeatures`: LR-up and the
    reference to a matching grid of its stride), or ``extractor``, a module mapping images ``[1, 3, H, W]`` in
    ``[0, 1]`` to features ``[1, C, H, W]`` at full resolution (applied to LR-up and to the reference
    taken down and up 4x), or by default :func:`~amsa.models.matching_features.default_matching_features`.
    ``backend`` and ``seed`` go to :func:`amsa.cfe_patchmatch`. ``device`` defaults to CUDA when
    available. ``log`` receives the printed lines (``None``: silent). Returns the table rows, the table
    text and the written files.
    """
    t_start = time.perf_counter()
    say = log if log is not None else (lambda s: None)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    if features is None:
        features = (default_matching_features() if extractor is None else
                    MatchingFeatures(extractor, extractor, 1, type(extractor).__name__, blur_ref=True))
    features = features.to(dev).eval()
    stride = features.stride

    pair = demo_pair(size)
    lr_up, ref = pair.lr_up.to(dev), pair.ref.to(dev)
    with torch.no_grad():
        (q, r), t_feat = timed(lambda: features(lr_up, ref), dev)
    cells = (size // stride, size // stride)
    if q.dim() != 4 or tuple(q.shape[-2:]) != cells or tuple(r.shape[-2:]) != cells:
        raise ValueError(f"features must map {size}x{size} images to a {cells} grid (stride {stride}), got "
                         f"{list(q.shape)} and {list(r.shape)}")
    name = features.name
    gy, gx = pair.geometry.scale
    truth, overlap = pair.truth_cells(stride)
    say(
        f"amsa demo: {os.path.basename(pair.source)}, HR crop {size}x{size} at {pair.hr_origin}, "
        f"LR {size // 4}x{size // 4} (4x bicubic), reference {tuple(pair.ref.shape[-2:])} at scale "
        f"{gy:.3f}x{gx:.3f}, "
        f"{100 * overlap.float().mean():.0f}% of HR pixels inside it"
    )
    say(
        f"features: {name}, C={q.shape[1]}, {stride} px per matching cell, query LR-up "
        f"{tuple(q.shape[-2:])} vs reference{' down-up' if features.blur_ref else ''} "
        f"{tuple(r.shape[-2:])}, {t_feat:.2f} s; device {dev}, backend {backend}, seed {seed}, "
        f"torch threads {torch.get_num_threads()}"
    )

    # warm-up on a small crop (24x24: the smallest map 4 levels allow) so one-time set-up is not timed
    w = 24
    cfe_patchmatch(q[..., :w, :w], r[..., :w, :w], PAPER, seed=seed, backend=backend)
    enumerated_match(q[..., :w, :w], r[..., :w, :w])

    exact, t_enum = timed(lambda: enumerated_match(q, r), dev)
    truth = truth.to(dev)

    def within(m: Match) -> float:
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
        run = lambda iters=iters: cfe_patchmatch(q, r, iters, seed=seed, backend=backend, history=True)
        m, t = timed(run, dev)
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

    table = format_table(rows)
    say("")
    say(table)
    say(
        f"\nagreement: % of the {cells[0]}x{cells[1]} query cells matched to the same reference cell as "
        f"enumerated matching; within {TOLERANCE_PX:g} px: % of the {int(overlap.sum())} query cells whose "
        f"true reference position is inside the reference, within {TOLERANCE_PX:g} cells ({stride} px "
        f"each) of it; GFLOPs: analytic, matching only"
    )

    files = {
        "results": os.path.join(out, "results.csv"),
        "correspondences": os.path.join(out, "correspondences.png"),
        "convergence": os.path.join(out, "convergence.png"),
    }
    write_csv(rows, files["results"])
    plot_correspondences(pair, rows[0], enum_row, files["correspondences"], stride=stride)
    plot_convergence(curves, enum_row, files["convergence"])
    total = time.perf_counter() - t_start
    say(f"wrote {', '.join(files.values())} ({total:.1f} s in all)")
    return DemoResult(pair, rows, table, files, feature_seconds=t_feat, total_seconds=total)
