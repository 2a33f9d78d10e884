"""The matching grid and the truth on it, shared by the training validation
(:mod:`amsa.training.correspondence`, :mod:`amsa.training.pairs`), the demo (:mod:`amsa.demo.pair`) and
the figure scripts.

Coordinates are pixel-index (y, x) (pixel ``i`` centred at index ``i``). A grid of ``stride`` pixels per
cell has cell ``i`` covering pixels ``[s i, s i + s)``, centred at ``s i + (s - 1) / 2`` (stride 4:
``4 i + 1.5``).
"""

from __future__ import annotations

import torch

__all__ = ["cell_centres", "grid_truth"]


def cell_centres(cells: tuple[int, int], stride: int) -> torch.Tensor:
    """[h, w, 2] float64 (y, x) pixel-index coordinates of the centres ``s i + (s - 1) / 2`` of an
    ``h x w`` grid of ``stride`` pixels per cell."""
    ys, xs = torch.meshgrid(torch.arange(cells[0], dtype=torch.float64),
                            torch.arange(cells[1], dtype=torch.float64), indexing="ij")
    return torch.stack([stride * ys, stride * xs], -1) + (stride - 1) / 2


def grid_truth(ref_yx: torch.Tensor, ref_size: tuple[int, int],
               stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The truth on a matching grid of ``stride`` pixels per cell: ``ref_yx`` [h, w, 2] (y, x) reference
    pixel coordinates of the query cells' centres (:func:`cell_centres`), ``ref_size`` the reference's
    (H, W) in pixels. Returns ``truth`` [h, w, 2] float32 in reference cells, ``(p - (s - 1) / 2) / s``,
    and ``inside`` [h, w] bool: the truth's 3x3 patch lies inside the reference grid
    (``floor(H / s) x floor(W / s)`` cells; False where ``ref_yx`` is NaN)."""
    truth = ((ref_yx.to(torch.float64) - (stride - 1) / 2) / stride).to(torch.float32)
    h2, w2 = ref_size[0] // stride, ref_size[1] // stride
    inside = ((truth[..., 0] >= 1) & (truth[..., 0] <= h2 - 2)
              & (truth[..., 1] >= 1) & (truth[..., 1] <= w2 - 2))
    return truth, inside
