"""Matching (paper section 3.1, Eq. 1-5): CFE-PatchMatch and the enumerated baseline.

``types`` (Match, Snapshot, Pyramid) · ``schedule`` (levels, dilations, initialisation, passing up, FLOPs)
· ``torch_backend`` (the PyTorch path, the kernels' reference) · ``triton_backend`` (the kernels' layouts)
· ``patchmatch`` (:func:`cfe_patchmatch`) · ``enumerated`` (:func:`enumerated_match`).

:func:`check_matching` is the matchers' input check (shapes, dtypes, devices, NaN/Inf, errors naming the
argument), for matchers built on this library such as the benchmarks' baselines.
"""

from amsa._checks import check_matching
from amsa.matching.enumerated import enumerated_match, matmul_argmax
from amsa.matching.patchmatch import CFEPatchMatch, cfe_patchmatch, patch_similarity
from amsa.matching.schedule import dilations, upsample_positions
from amsa.matching.types import Match, Pyramid, Snapshot

__all__ = [
    "CFEPatchMatch",
    "Match",
    "Pyramid",
    "Snapshot",
    "cfe_patchmatch",
    "check_matching",
    "dilations",
    "enumerated_match",
    "matmul_argmax",
    "patch_similarity",
    "upsample_positions",
]
