"""amsa: Triton kernels for reference-based super-resolution (AMSA, AAAI-22).

CFE-PatchMatch (paper section 3.1, Eq. 1-5) lives in :mod:`amsa.patchmatch`; the deformable gather of the
Dynamic Aggregation (Eq. 6-8) in :mod:`amsa.deform`.
"""

from amsa.deform import ModulatedDeformConv2d, deform_conv2d
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
    "ModulatedDeformConv2d",
    "Match",
    "Pyramid",
    "Snapshot",
    "cfe_patchmatch",
    "deform_conv2d",
    "dilations",
    "enumerated_match",
    "patch_similarity",
    "upsample_positions",
]
__version__ = "0.1.0"
