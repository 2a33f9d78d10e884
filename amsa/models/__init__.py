"""The AMSA network (paper Fig. 2 and section 3.2): ``aggregation`` (Eq. 6-10 building blocks),
``restoration`` (the trained network, official names), ``extractors`` (VGG19 and the contrastive matching
extractor), ``checkpoints`` (loading official and wrapped state dicts), ``pipeline`` (:class:`AMSA`)."""

from amsa.models.aggregation import (
    DynamicAggregationConv,
    PreOffsetDeformConv,
    flow_from_positions,
    multiscale_weights,
    pre_offsets,
)
from amsa.models.checkpoints import CheckpointError, load_weights
from amsa.models.extractors import ContrasExtractorSep, VGGFeatures, vgg_from_torchvision
from amsa.models.pipeline import AMSA
from amsa.models.restoration import RestorationNet

__all__ = [
    "AMSA",
    "CheckpointError",
    "ContrasExtractorSep",
    "DynamicAggregationConv",
    "PreOffsetDeformConv",
    "RestorationNet",
    "VGGFeatures",
    "flow_from_positions",
    "load_weights",
    "multiscale_weights",
    "pre_offsets",
    "vgg_from_torchvision",
]
