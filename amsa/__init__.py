"""amsa: Triton kernels for reference-based super-resolution (AMSA, AAAI-22).

CFE-PatchMatch (paper section 3.1, Eq. 1-5) lives in :mod:`amsa.patchmatch`; the deformable gather of the
Dynamic Aggregation (Eq. 6-8) in :mod:`amsa.deform`.
"""

from amsa.aggregation import multiscale_weights, pre_offsets
from amsa.checkpoints import CheckpointError, load_weights
from amsa.deform import ModulatedDeformConv2d, deform_conv2d
from amsa.extractors import ContrasExtractorSep, VGGFeatures, vgg_from_torchvision
from amsa.model import AMSA, RestorationNet
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
    "AMSA",
    "CFEPatchMatch",
    "CheckpointError",
    "ContrasExtractorSep",
    "ModulatedDeformConv2d",
    "Match",
    "Pyramid",
    "RestorationNet",
    "Snapshot",
    "VGGFeatures",
    "cfe_patchmatch",
    "deform_conv2d",
    "dilations",
    "enumerated_match",
    "load_weights",
    "multiscale_weights",
    "patch_similarity",
    "pre_offsets",
    "upsample_positions",
    "vgg_from_torchvision",
]
__version__ = "0.1.0"
