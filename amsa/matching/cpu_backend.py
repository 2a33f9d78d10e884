"""The CPU path of CFE-PatchMatch: one level's query and references in the layouts of the numba kernels
(``kernels/cpu_patchmatch.py``), one fused call per propagation step for every reference of the level;
the counterpart of :mod:`amsa.matching.triton_backend`, with the same interface."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amsa.matching.torch_backend import acc_dtype, patch_norms
from kernels.cpu_patchmatch import cpu_patch_score, cpu_patchmatch_step

__all__ = ["CPULevel"]


def _padded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, C, h, w] -> zero-padded channels-last [B, h+2, w+2, C] in ``dtype``, contiguous."""
    return F.pad(x.to(dtype), (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous()


class CPULevel:
    """All references of one level in the CPU kernels' layouts (zero-padded channels-last maps, the
    references flattened and concatenated, per-level patch norms); the counterpart of
    :class:`amsa.matching.triton_backend.TritonLevel`. fp16/bf16 features are computed in fp32, as on the
    PyTorch path."""

    def __init__(self, query: torch.Tensor, refs: list[torch.Tensor]):
        acc = acc_dtype(query)
        self.query = _padded(query, acc)
        self.qnorm = patch_norms(query).contiguous()
        padded = [_padded(r, acc).reshape(-1) for r in refs]
        self.ref = torch.cat(padded)
        self.rnorm = torch.cat([patch_norms(r).reshape(-1) for r in refs])
        first = [sum(p.numel() for p in padded[:i]) for i in range(len(refs))]
        first_norm = [sum(r.shape[0] * r.shape[2] * r.shape[3] for r in refs[:i]) for i in range(len(refs))]
        meta = [[f, n, r.shape[2], r.shape[3]] for f, n, r in zip(first, first_norm, refs)]
        self.ref_meta = torch.tensor(meta, dtype=torch.int64)

    def score_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Eq. 2 for positions [R, B, hq, wq, 2] -> scores [R, B, hq, wq]."""
        return cpu_patch_score(self.query, self.qnorm, self.ref, self.rnorm, self.ref_meta, pos.contiguous())

    def step(self, pos: torch.Tensor, score: torch.Tensor, k: int, offset_corrected: bool):
        """One fused propagation step at dilation k for every reference: new (pos, score)."""
        return cpu_patchmatch_step(self.query, self.qnorm, self.ref, self.rnorm, self.ref_meta,
                                   pos.contiguous(), score.contiguous(), k, bool(offset_corrected))
