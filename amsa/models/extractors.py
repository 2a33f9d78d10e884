"""VGG feature extractors: the frozen VGG19 of the content features and the perceptual loss, and the
contrastive matching extractor (two VGG16 branches to conv3_1) of C2-Matching used by AMSA's matching.

Both take RGB images in [0, 1] and normalise them with the ImageNet mean/std inside (buffers ``mean`` and
``std``, part of the state dict as in the official checkpoints). Layers are named as in the official code
(``conv3_1``, ``relu3_1``, ``pool2``, ...), so the state-dict keys equal the official ones:
``vgg_net.conv1_1.weight`` (:class:`VGGFeatures`), ``feature_extraction_image1.model.conv1_1.weight``
(:class:`ContrasExtractorSep`). :func:`vgg_from_torchvision` converts a torchvision-format state dict
(``features.N.weight``) to these names. ReLUs are not in-place, so every returned feature is what the
layer computed.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from amsa._checks import check_image
from amsa.models.checkpoints import WeightsSource, load_weights

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LEARNED", "LEARNED_FEATURE_WEIGHTS", "VGG_LAYERS",
           "ContrasExtractorSep", "VGGFeatures", "vgg_from_torchvision"]

# The matching extractor trained in this repository (``python -m amsa train-extractor``, README "Training
# the matching extractor"), shipped with the package; ``feature_weights="@learned"`` names it.
LEARNED = "@learned"
LEARNED_FEATURE_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights",
                                       "feature_extraction_small.pth")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Convolutions per block (64, 128, 256, 512, 512 channels); each conv is followed by a ReLU, each block by
# a 2x2 max-pool. The layer order equals torchvision's ``vgg*.features`` indices.
_BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
_WIDTHS = (64, 128, 256, 512, 512)


def _layer_names(arch: str) -> tuple[str, ...]:
    names = []
    for b, n_conv in enumerate(_BLOCKS[arch], start=1):
        for i in range(1, n_conv + 1):
            names += [f"conv{b}_{i}", f"relu{b}_{i}"]
        names.append(f"pool{b}")
    return tuple(names)


VGG_LAYERS: dict[str, tuple[str, ...]] = {arch: _layer_names(arch) for arch in _BLOCKS}


def _check_arch(arch: str) -> None:
    if arch not in VGG_LAYERS:
        raise ValueError(f"arch must be one of {sorted(VGG_LAYERS)}, got {arch!r}")


def _vgg_stack(arch: str, last: str) -> nn.Sequential:
    """The VGG ``features`` layers of ``arch`` up to and including ``last``, with the official names."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = 3
    for name in VGG_LAYERS[arch][: VGG_LAYERS[arch].index(last) + 1]:
        if name.startswith("conv"):
            c_out = _WIDTHS[int(name[4]) - 1]
            layers[name] = nn.Conv2d(c_in, c_out, 3, padding=1)
            c_in = c_out
        elif name.startswith("relu"):
            layers[name] = nn.ReLU()
        else:
            layers[name] = nn.MaxPool2d(2, 2)
    return nn.Sequential(layers)


def vgg_from_torchvision(
    state_dict: Mapping[str, torch.Tensor], arch: str, *, prefix: str = "vgg_net.", last: str | None = None
) -> dict[str, torch.Tensor]:
    """Rename a torchvision VGG state dict (``features.N.weight``) to the official layer names.

    ``features.N`` becomes ``{prefix}{VGG_LAYERS[arch][N]}``; layers after ``last`` (default: all) and the
    classifier are dropped; ImageNet ``mean``/``std`` buffers are added under the prefix's parent (``mean``
    for ``vgg_net.``, ``feature_extraction_image1.mean`` for ``feature_extraction_image1.model.``).
    """
    _check_arch(arch)
    names = VGG_LAYERS[arch]
    stop = len(names) if last is None else names.index(last) + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit() and int(parts[1]) < stop:
            out[f"{prefix}{names[int(parts[1])]}.{parts[2]}"] = value
    owner = prefix.rstrip(".").rpartition(".")[0]
    owner = f"{owner}." if owner else ""
    out[f"{owner}mean"] = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    out[f"{owner}std"] = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return out


class _Normalised(nn.Module):
    """ImageNet mean/std buffers (persistent: the official checkpoints hold them)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def normalise(self, x: torch.Tensor, name: str) -> torch.Tensor:
        check_image(x, name)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def _freeze(module: nn.Module, requires_grad: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(requires_grad)


class VGGFeatures(_Normalised):
    """VGG16/VGG19 features at named layers: ``VGGFeatures("vgg19", ("relu1_1", "relu2_1", "relu3_1"))``.

    ``forward(x)``: x [B, 3, H, W] RGB in [0, 1] -> ``{layer: [B, C_layer, H / 2^p, W / 2^p]}`` for the
    requested layers (p = pools before the layer). Only the layers up to the deepest requested one are built.
    State-dict keys: ``mean``, ``std``, ``vgg_net.<layer>.weight|bias`` (the official ``VGG19_to_relu3_1``
    names for relu3_1). ``weights``: a path or state dict in this layout or torchvision's (``features.N``,
    converted by :func:`vgg_from_torchvision`); without weights the layers are random and a warning says so.
    """

    def __init__(
        self,
        arch: str,
        layers: Sequence[str],
        *,
        weights: WeightsSource | None = None,
        requires_grad: bool = False,
    ) -> None:
        super().__init__()
        _check_arch(arch)
        if isinstance(layers, str) or not layers:
            raise ValueError(f"layers must be a non-empty sequence of layer names, got {layers!r}")
        unknown = [n for n in layers if n not in VGG_LAYERS[arch]]
        if unknown:
            raise ValueError(f"layers {unknown} are not {arch} layers; valid: {VGG_LAYERS[arch]}")
        self.arch = arch
        self.layers = tuple(layers)
        self.last = max(self.layers, key=VGG_LAYERS[arch].index)
        self.vgg_net = _vgg_stack(arch, self.last)
        if weights is None:
            warnings.warn(
                f"VGGFeatures({arch!r}): no weights given, the VGG layers are RANDOM; pass weights= (a local "
                f"torchvision-format or official {arch} state dict) for meaningful features",
                stacklevel=2,
            )
        else:
            self.load_weights(weights)
        _freeze(self, requires_grad)

    def load_weights(self, weights: WeightsSource) -> None:
        """Load an official-layout or torchvision-format state dict (path or dict), strictly."""
        load_weights(self, weights, what=f"{self.arch} VGG weights",
                     convert=lambda sd: vgg_from_torchvision(sd, self.arch, last=self.last))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.normalise(x, "x")
        out = {}
        for name, layer in self.vgg_net.named_children():
            x = layer(x)
            if name in self.layers:
                out[name] = x
        return out

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, layers={self.layers}"


class ContrasExtractorLayer(_Normalised):
    """One branch of the contrastive extractor: VGG16 up to conv3_1 (pre-ReLU), [B, 3, H, W] in [0, 1] ->
    [B, 256, H/4, W/4]. State-dict keys ``mean``, ``std``, ``model.conv1_1.weight``, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _vgg_stack("vgg16", "conv3_1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalise(x, "image"))


def _contras_from_torchvision(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision VGG16 state dict as both branches of :class:`ContrasExtractorSep` (the official
    training starts both from ImageNet VGG16)."""
    out: dict[str, torch.Tensor] = {}
    for branch in ("feature_extraction_image1", "feature_extraction_image2"):
        out.update(vgg_from_torchvision(sd, "vgg16", prefix=f"{branch}.model.", last="conv3_1"))
    return out


class ContrasExtractorSep(nn.Module):
    """C2-Matching's contrastive matching extractor with separate weights for the two image domains.

    ``feature_extraction_image1`` embeds the LR-upsampled image, ``feature_extraction_image2`` the
    reference: ``forward(lr_up, ref) -> (K, Q)``, each [B, 256, H/4, W/4]. Keys as the official
    ``feature_extraction.pth``; ``weights`` may also be a torchvision VGG16 state dict (both branches
    from it) or ``"@learned"``, the extractor trained in this repository and shipped with the package
    (:data:`LEARNED_FEATURE_WEIGHTS`). Frozen (no gradient) unless ``requires_grad``.
    """

    def __init__(self, *, weights: WeightsSource | None = None, requires_grad: bool = False) -> None:
        super().__init__()
        self.feature_extraction_image1 = ContrasExtractorLayer()
        self.feature_extraction_image2 = ContrasExtractorLayer()
        if weights is None:
            warnings.warn(
                "ContrasExtractorSep: no weights given, the matching extractor is RANDOM; pass the official "
                "feature_extraction.pth (local file) or '@learned' for meaningful matches",
                stacklevel=2,
            )
        else:
            if isinstance(weights, str) and weights == LEARNED:
                weights = LEARNED_FEATURE_WEIGHTS
            load_weights(self, weights, what="contrastive extractor weights",
                         convert=_contras_from_torchvision)
        _freeze(self, requires_grad)

    def forward(self, lr_up: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.feature_extraction_image1(lr_up), self.feature_extraction_image2(ref)
