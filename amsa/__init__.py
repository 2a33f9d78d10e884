"""amsa: Triton kernels for reference-based super-resolution (AMSA, AAAI-22).

Layers, each importing only those below it: ``kernels/`` (Triton kernels and their ops) <-
:mod:`amsa.matching` (CFE-PatchMatch, paper section 3.1, Eq. 1-5) and :mod:`amsa.deform` (the deformable
gather of the Dynamic Aggregation, Eq. 6-8) <- :mod:`amsa.models` (the network, Eq. 6-10) <-
:mod:`amsa.training`, :mod:`amsa.evaluation`, :mod:`amsa.demo` <- :mod:`amsa.cli`.
"""

from amsa.deform import ModulatedDeformConv2d, deform_conv2d
from amsa.matching import (
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
from amsa.models import (
    AMSA,
    CheckpointError,
    ContrasExtractorSep,
    RestorationNet,
    VGGFeatures,
    load_weights,
    multiscale_weights,
    pre_offsets,
    vgg_from_torchvision,
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
