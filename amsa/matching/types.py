"""What the matchers return (:class:`Match`, :class:`Snapshot`) and take (:class:`Pyramid`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Match", "Pyramid", "Snapshot"]


@dataclass
class Snapshot:
    """State after ``iteration`` iterations on ``level`` (0 = coarsest); iteration 0 is the state on
    entering the level (random/given init, or the coarser level's result passed up).

    pos: int64 [B, h, w, 2] (y, x) in the level's reference pixels; score: float32 [B, h, w];
    flops: cumulative analytic FLOPs of the run up to this snapshot."""

    level: int
    iteration: int
    pos: torch.Tensor
    score: torch.Tensor
    flops: int
    query_size: tuple[int, int]
    ref_size: tuple[int, int]


@dataclass
class Match:
    """Correspondences of every query pixel in one reference map.

    pos: int64 [B, Hq, Wq, 2], (y, x) of the matched patch centre in reference pixels (H_i in the paper);
    score: float32 [B, Hq, Wq] (float64 for float64 features), cosine similarity of the two 3x3 patches,
    in [-1, 1] (S_i);
    flops: analytic FLOPs spent (multiply-adds count 2); history: per-iteration snapshots or None."""

    pos: torch.Tensor
    score: torch.Tensor
    flops: int = 0
    history: list[Snapshot] | None = field(default=None, repr=False)


class Pyramid(tuple):
    """Explicit feature pyramid, coarse to fine: ``Pyramid([f_1/8, f_1/4, f_1/2, f_1])``, each [B, C, h, w].

    Pass one instead of a tensor to ``cfe_patchmatch`` to use your own coarse levels (the official release
    runs the feature extractor on downsampled images) instead of area-downsampled features."""

    def __new__(cls, levels: Sequence[torch.Tensor]):
        levels = tuple(levels)
        if not levels:
            raise ValueError("Pyramid needs at least one level")
        return super().__new__(cls, levels)
