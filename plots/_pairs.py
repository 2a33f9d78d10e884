"""Real RefSR pairs with known geometry for the figure scripts: the demo pair (scale and shift), a
homography warp of scikit-image's ``coffee.png`` and scikit-image's Middlebury stereo pair (disparity).

Each :class:`StudyPair` holds the LR-up query, the sharp reference and ``ref_of``, the map from query pixel
coordinates (y, x) (pixel ``i`` centred at ``i``) to reference pixel coordinates (NaN where the pixel has
no correspondence, e.g. occluded); :meth:`StudyPair.truth` puts it on a matching grid of any stride.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from amsa.demo.pair import demo_pair
from amsa.grid import cell_centres, grid_truth
from amsa.io import load_image
from amsa.models.matching_features import down_up
from amsa.training.pairs import HomographyPairSet, apply_homography, photo_paths

PAIRS = ("demo", "coffee", "stereo")
COFFEE_SEED = 5
COFFEE_GEOMETRY = {"scale": (0.8, 1.25), "max_rotation": 10.0, "max_shift": 0.15}


@dataclass(frozen=True)
class StudyPair:
    name: str
    label: str
    lr_up: torch.Tensor  # [1, 3, H, W]
    ref: torch.Tensor  # [1, 3, Hr, Wr], sharp
    ref_of: Callable[[torch.Tensor], torch.Tensor] | None  # [..., 2] query (y, x) -> reference (y, x)

    def truth(self, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``truth`` [H/s, W/s, 2] in reference grid pixels and ``inside`` [H/s, W/s] (the true match's
        3x3 patch lies inside the reference grid; False where there is none)."""
        centres = cell_centres((self.lr_up.shape[-2] // stride, self.lr_up.shape[-1] // stride), stride)
        return grid_truth(self.ref_of(centres), tuple(self.ref.shape[-2:]), stride)


def demo(size: int) -> StudyPair:
    ref_size = min(size, 408)  # the photo rescaled by 0.8 is 410 x 480
    p = demo_pair(size, ref_size=ref_size)
    s = torch.tensor(p.geometry.scale, dtype=torch.float64)
    t = torch.tensor(p.geometry.shift, dtype=torch.float64)
    return StudyPair("demo", f"demo pair {size}x{size} vs {ref_size}x{ref_size} (scale 0.8, shifted)",
                     p.lr_up, p.ref, lambda c: c * s + t)


def coffee(size: int) -> StudyPair:
    data = HomographyPairSet(photo_paths("@skimage", ["coffee.png"]), gt_size=size, flip=False, rot90=False,
                             **COFFEE_GEOMETRY)
    item = data[(0, COFFEE_SEED)]
    h = item["homography"]
    return StudyPair("coffee", f"coffee {size}x{size}, homography (seed {COFFEE_SEED})",
                     item["img_in_up"][None], item["img_ref"][None],
                     lambda c: apply_homography(h, c.flip(-1)).flip(-1))


def stereo(size: int) -> StudyPair:
    """The central ``size x size`` window of both views (the reference window moved left by the median
    disparity, so that most left pixels keep their match inside it)."""
    left, right = (photo_paths("@skimage", [f"motorcycle_{v}.png"])[0] for v in ("left", "right"))
    disp = torch.from_numpy(np.load(os.path.join(os.path.dirname(left), "motorcycle_disp.npz"))["arr_0"])
    disp = disp.to(torch.float64)
    lft, rgt = load_image(left), load_image(right)
    h, w = lft.shape[-2:]
    y0, x0 = (h - size) // 2, (w - size) // 2
    shift = int(torch.nanmedian(torch.where(torch.isfinite(disp), disp, torch.nan)).round())
    x1 = max(0, x0 - shift)
    query, ref = lft[..., y0:y0 + size, x0:x0 + size], rgt[..., y0:y0 + size, x1:x1 + size]
    win = disp[y0:y0 + size, x0:x0 + size]

    def ref_of(c: torch.Tensor) -> torch.Tensor:
        iy = c[..., 0].round().long().clamp(0, size - 1)
        ix = c[..., 1].round().long().clamp(0, size - 1)
        d = win[iy, ix]
        d = torch.where(torch.isfinite(d), d, torch.nan)  # occluded / unknown: no correspondence
        return torch.stack([c[..., 0], c[..., 1] + x0 - d - x1], -1)

    return StudyPair("stereo", f"stereo motorcycle {size}x{size} (disparity {shift} px median)",
                     down_up(query), ref, ref_of)


def study_pairs(names: list[str], size: int) -> list[StudyPair]:
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        raise SystemExit(f"--pairs: unknown {unknown}; choose from {', '.join(PAIRS)}")
    build = {"demo": demo, "coffee": coffee, "stereo": stereo}
    try:
        return [build[n](size) for n in names]
    except FileNotFoundError as exc:  # scikit-image's photos not installed
        raise SystemExit(f"--pairs: {exc}") from exc
