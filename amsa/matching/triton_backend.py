"""The Triton path of CFE-PatchMatch: one level's query and references in the layouts of the kernels
(``kernels/patchmatch.py``), one fused launch per propagation step for every reference of the level."""

from __future__ import annotations

import torch

from amsa.matching.torch_backend import patch_norms
from kernels.patchmatch import patch_score, patchmatch_step

__all__ = ["TritonLevel"]


class TritonLevel:
    """All references of one level in the kernels' layouts (channels-last query, the references'
    pixel rows concatenated, per-level patch norms); the counterpart of
    :class:`amsa.matching.torch_backend.TorchLevels`, with the same interface."""

    def __init__(self, query: torch.Tensor, refs: list[torch.Tensor]):
        C = query.shape[1]
        self.query = query.permute(0, 2, 3, 1).contiguous()
        self.qnorm = patch_norms(query).contiguous()
        self.ref = torch.cat([r.permute(0, 2, 3, 1).reshape(-1, C) for r in refs])
        self.rnorm = torch.cat([patch_norms(r).reshape(-1) for r in refs])
        rows = [r.shape[0] * r.shape[2] * r.shape[3] for r in refs]
        first = [sum(rows[:i]) for i in range(len(refs))]
        self.ref_meta = torch.tensor([[f, r.shape[2], r.shape[3]] for f, r in zip(first, refs)],
                                     dtype=torch.int64, device=query.device)

    def score_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Eq. 2 for positions [R, B, hq, wq, 2] -> scores [R, B, hq, wq]."""
        return patch_score(self.query, self.qnorm, self.ref, self.rnorm, self.ref_meta, pos.contiguous())

    def step(self, pos: torch.Tensor, score: torch.Tensor, k: int, offset_corrected: bool):
        """One fused propagation step at dilation k for every reference: new (pos, score)."""
        return patchmatch_step(self.query, self.qnorm, self.ref, self.rnorm, self.ref_meta,
                               pos.contiguous(), score.contiguous(), k, int(offset_corrected))
