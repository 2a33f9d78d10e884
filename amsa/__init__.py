"""amsa: Triton kernels for reference-based super-resolution (AMSA, AAAI-22).

CFE-PatchMatch (paper section 3.1, Eq. 1-5) lives in :mod:`amsa.patchmatch`.
"""

from amsa.patchmatch import (
    CFEPatchMatch,
    Match,
    Pyramid,
    Snapshot,
    cfe_patchmatch,
    dilations,
    enumerated_match,
    patch_similarity,
    upsample_positions,
)

__all__ = [
    "CFEPatchMatch",
    "Match",
    "Pyramid",
    "Snapshot",
    "cfe_patchmatch",
    "dilations",
    "enumerated_match",
    "patch_similarity",
    "upsample_positions",
]
__version__ = "0.1.0"
