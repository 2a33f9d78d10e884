"""The CPU path of CFE-PatchMatch: one level's query and references in the layouts of the numba kernels
(``kernels/cpu_patchmatch.py``), one fused call per propagation step for every reference of the level;
the counterpart of :mod:`amsa.matching.triton_backend`, with the same interface."""

from __future__ import annotations

import torch

from amsa.matching.torch_backend import acc_dtype, concatenated_refs, pad_channels_last, patch_norms
from kernels.cpu_patchmatch import cpu_patch_score, cpu_patchmatch_step

__all__ = ["CPULevel"]


class CPULevel:
    """All references of one level in the CPU kernels' layouts (zero-padded channels-last maps, the
    references flattened and concatenated, per-level patch norms); the counterpart of
    :class:`amsa.matching.triton_backend.TritonLevel`. fp16/bf16 features are computed in fp32, as on the
    PyTorch path."""

    def __init__(self, query: torch.Tensor, refs: list[torch.Tensor]):
        acc = acc_dtype(query)
        self.query = pad_channels_last(query.to(acc))
        self.qnorm = patch_norms(query).contiguous()
        # The kernels address the maps in elements.
        padded = [pad_channels_last(r.to(acc)) for r in refs]
        self.ref, self.rnorm, self.ref_meta = concatenated_refs(padded, refs, 1)

    def score_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Eq. 2 for positions [R, B, hq, wq, 2] -> scores [R, B, hq, wq]."""
        return cpu_patch_score(self.query, self.qnorm, self.ref, self.rnorm, self.ref_meta, pos.contiguous())

    def step(self, pos: torch.Tensor, score: torch.Tensor, k: int, offset_corrected: bool):
        """One fused propagation step at dilation k for every reference: new (pos, score)."""
        return cpu_patchmatch_step(self.query, self.qnorm, self.ref, self.rnorm, self.ref_meta,
                                   pos.contiguous(), score.contiguous(), k, bool(offset_corrected))
