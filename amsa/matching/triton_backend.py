"""The Triton path of CFE-PatchMatch: one level's query and references in the layouts of the kernels
(``kernels/patchmatch.py``), one fused launch per propagation step for every reference of the level.

Each map is copied once per level into the kernels' layout: zero-padded by one pixel, channels-last, its
channels zero-padded to ``PaddedLayout(C, element size).CP`` (a multiple of 16 bytes), so that the kernels'
row gathers are unmasked 16-byte vectors. Features keep their dtype (fp32, fp16 or bf16); norms are fp32.
"""

from __future__ import annotations

import torch

from amsa.matching.torch_backend import concatenated_refs, patch_norms
from kernels.patchmatch import PaddedLayout, pad_map, patch_score, patchmatch_step

__all__ = ["TritonLevel"]


class TritonLevel:
    """All references of one level in the kernels' layouts (padded channels-last maps, the references
    concatenated, per-level patch norms); the counterpart of
    :class:`amsa.matching.torch_backend.TorchLevels`, with the same interface."""

    def __init__(self, query: torch.Tensor, refs: list[torch.Tensor]):
        cp = PaddedLayout(query.shape[1], query.element_size()).CP
        self.query = pad_map(query, cp)
        self.qnorm = patch_norms(query).contiguous()
        # The kernels address the maps in padded pixels of cp channels.
        self.ref, self.rnorm, self.ref_meta = concatenated_refs([pad_map(r, cp) for r in refs], refs, cp)

    def score_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Eq. 2 for positions [R, B, hq, wq, 2] -> scores [R, B, hq, wq]."""
        return patch_score(self.query, self.qnorm, self.ref, self.rnorm, self.ref_meta, pos.contiguous())

    def step(self, pos: torch.Tensor, score: torch.Tensor, k: int, offset_corrected: bool):
        """One fused propagation step at dilation k for every reference: new (pos, score)."""
        return patchmatch_step(self.query, self.qnorm, self.ref, self.rnorm, self.ref_meta,
                               pos.contiguous(), score.contiguous(), k, int(offset_corrected))
