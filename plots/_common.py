"""Helpers the figure scripts share: output paths, CSV rows, features of image pairs, seed bands
(``down_up``, the blur domain of LR-up, is :func:`amsa.models.matching_features.down_up`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from amsa.io import load_image
from amsa.models.matching_features import down_up

FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")
QUICK_OUT = os.path.join("out", "plots")


def output_dir(out: str | None, quick: bool) -> str:
    """``out``, else ``plots/figures`` (full runs, committed) or ``out/plots`` (quick runs); created."""
    path = out if out is not None else (QUICK_OUT if quick else FIGURES)
    os.makedirs(path, exist_ok=True)
    return path


def parse_ints(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (argparse type)."""
    return [int(v) for v in text.split(",") if v.strip()]


def parse_floats(text: str) -> list[float]:
    """``"2,1,0.5"`` -> ``[2.0, 1.0, 0.5]`` (argparse type)."""
    return [float(v) for v in text.split(",") if v.strip()]


def user_pair(hr_path: str, ref_path: str, size: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A pair given on the command line: the HR image and a reference, each centre-cropped to at most
    ``size`` pixels per side and to a multiple of 4. Returns (name, LR-up, reference): the query image is
    the HR image bicubic-downsampled 4x and upsampled back, as RefSR's LR-up; the reference stays sharp
    (features that need it blurred do that themselves:
    :class:`amsa.models.matching_features.MatchingFeatures`)."""
    crops = []
    for path in (hr_path, ref_path):
        img = load_image(path)
        h, w = img.shape[-2:]
        ch, cw = min(h, size) // 4 * 4, min(w, size) // 4 * 4
        if min(ch, cw) < 96:
            raise SystemExit(f"{path}: {h}x{w} is too small, at least 96x96 pixels needed for 4 levels")
        y, x = (h - ch) // 2, (w - cw) // 2
        crops.append(img[..., y : y + ch, x : x + cw])
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]
    return f"{stem(hr_path)}_{stem(ref_path)}", down_up(crops[0]), crops[1]


@torch.no_grad()
def features(extractor: Callable[[torch.Tensor], torch.Tensor], *images: torch.Tensor) -> list[torch.Tensor]:
    """Matching features of each image [1, 3, H, W] -> [1, C, H, W]."""
    return [extractor(img) for img in images]


def mean_band(ax, x: Sequence[float], runs: Sequence[Sequence[float]], **style) -> None:
    """Mean over runs (seeds) as a line, min-max as a shaded band of the same colour."""
    t = torch.tensor(runs, dtype=torch.float64)
    line = ax.plot(x, t.mean(0).tolist(), **style)[0]
    if len(runs) > 1:
        ax.fill_between(x, t.min(0).values.tolist(), t.max(0).values.tolist(), color=line.get_color(),
                        alpha=0.18, lw=0)
