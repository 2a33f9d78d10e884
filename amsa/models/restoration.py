"""The restoration network of AMSA (paper Fig. 2): content features, Dynamic Aggregation (Eq. 6-8) and
restoration at the 1x, 2x, 4x feature scales, Multi-Scale Aggregation (Eq. 9-10).

:class:`RestorationNet` keeps the official module names, so ``restoration_mse.pth`` / ``restoration.pth``
load into ``AMSA.net`` with ``strict=True`` (9,676,454 parameters at the default size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from amsa.deform import Backend
from amsa.models.aggregation import DynamicAggregationConv, PreOffsetDeformConv
from amsa.timing import stage

__all__ = ["BRANCHES", "SCALE", "ContentExtractor", "DynamicAggregationRestoration", "ResidualBlockNoBN",
           "RestorationNet"]

SCALE = 4  # super-resolution factor; the matching features live at 1/4 of the HR grid (VGG relu3_1 / conv3_1)
# Feature scales of the restoration, coarse to fine: (official name, VGG19 layer of V_i, its channels, scale).
BRANCHES = (("small", "relu3_1", 256, 1), ("medium", "relu2_1", 128, 2), ("large", "relu1_1", 64, 4))


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.1)


class ResidualBlockNoBN(nn.Module):
    """x + conv2(relu(conv1(x))), 3x3 convolutions, no normalisation."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv2 = nn.Conv2d(nf, nf, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


def _residual_blocks(n_blocks: int, nf: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlockNoBN(nf) for _ in range(n_blocks)))


class ContentExtractor(nn.Module):
    """LR content features F: conv 3->ngf, LReLU(0.1), ``n_blocks`` residual blocks.

    [B, 3, h, w] -> [B, ngf, h, w]."""

    def __init__(self, ngf: int, n_blocks: int) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(3, ngf, 3, padding=1)
        self.body = _residual_blocks(n_blocks, ngf)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.body(_lrelu(self.conv_first(lr)))


class DynamicAggregationRestoration(nn.Module):
    """Dynamic Aggregation (Eq. 6-8) and restoration at the 1x, 2x, 4x feature scales, then Multi-Scale
    Aggregation (Eq. 9-10). Submodules per scale ``{small, medium, large}`` with the official names:
    ``*_deform_conv`` (Eq. 6), ``*_offset_conv1/2`` (Eq. 7), ``*_dyn_agg`` (Eq. 8), ``head_*``, ``body_*``
    (``n_blocks`` residual blocks), ``tail_*`` (x2 pixel shuffle; at 4x the output convs of Eq. 10)."""

    def __init__(self, ngf: int, n_blocks: int, groups: int, *, backend: Backend = "auto") -> None:
        super().__init__()
        for name, _, c, _ in BRANCHES:
            self.add_module(f"{name}_deform_conv", PreOffsetDeformConv(c, c, backend=backend))
            self.add_module(f"{name}_offset_conv1", nn.Conv2d(ngf + c, c, 3, padding=1))
            self.add_module(f"{name}_offset_conv2", nn.Conv2d(c, c, 3, padding=1))
            self.add_module(f"{name}_dyn_agg", DynamicAggregationConv(c, c, groups, backend=backend))
            head = nn.Sequential(nn.Conv2d(ngf + c, ngf, 3, padding=1), nn.LeakyReLU(0.1))
            self.add_module(f"head_{name}", head)
            self.add_module(f"body_{name}", _residual_blocks(n_blocks, ngf))
            if name == "large":
                tail = [nn.Conv2d(ngf, ngf // 2, 3, padding=1), nn.LeakyReLU(0.1),
                        nn.Conv2d(ngf // 2, 3, 3, padding=1)]
            else:
                tail = [nn.Conv2d(ngf, 4 * ngf, 3, padding=1), nn.PixelShuffle(2), nn.LeakyReLU(0.1)]
            self.add_module(f"tail_{name}", nn.Sequential(*tail))

    def dynamic_aggregation(
        self, name: str, content: torch.Tensor, ref_feat: torch.Tensor, pre_offset: torch.Tensor
    ) -> torch.Tensor:
        """Y_i of Eq. 8 at scale ``name`` from V_i (``ref_feat``), F (``content``), the matching offsets."""
        warped = getattr(self, f"{name}_deform_conv")(ref_feat, pre_offset)  # Y'_i, Eq. 6
        conv1, conv2 = getattr(self, f"{name}_offset_conv1"), getattr(self, f"{name}_offset_conv2")
        offset_feat = _lrelu(conv2(_lrelu(conv1(torch.cat([content, warped], dim=1)))))  # Eq. 7
        return _lrelu(getattr(self, f"{name}_dyn_agg")(ref_feat, offset_feat, pre_offset))  # Y_i, Eq. 8

    def forward(
        self,
        content: torch.Tensor,
        offsets: Sequence[dict[int, torch.Tensor]],
        ref_feats: Sequence[dict[str, torch.Tensor]],
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """content: F [B, ngf, h, w]; offsets[i][s]: pre-offsets [B, 18, s*h, s*w] of reference scale i at
        feature scale s; ref_feats[i][layer]: V_i; weights: S'_i [B, n, 4h, 4w] (Eq. 9) -> [B, 3, 4h, 4w]."""
        fused = None
        for i, (offset, feats) in enumerate(zip(offsets, ref_feats)):
            x = content
            for name, layer, _, scale in BRANCHES:
                with stage("amsa.aggregation"):
                    aggregated = self.dynamic_aggregation(name, x, feats[layer], offset[scale])
                with stage("amsa.restoration"):
                    head, body = getattr(self, f"head_{name}"), getattr(self, f"body_{name}")
                    h = body(head(torch.cat([x, aggregated], 1))) + x
                    if name != "large":
                        x = getattr(self, f"tail_{name}")(h)
            with stage("amsa.aggregation"):
                weighted = h * weights[:, i:i + 1]  # Eq. 10: sum_i Y_i-restored * S'_i
                fused = weighted if fused is None else fused + weighted
        with stage("amsa.restoration"):
            return self.tail_large(fused)


class RestorationNet(nn.Module):
    """The trainable part of AMSA: ``content_extractor`` and ``dyn_agg_restore`` (official names).

    ``forward(lr [B, 3, h, w], offsets, ref_feats, weights) -> [B, 3, 4h, 4w]``: the residual predicted from
    the aggregated reference features plus the bilinear 4x upsampling of ``lr``. Initialisation as the
    official code: convolutions normal(0, 0.02) with zero bias, every offset/mask convolution zero.
    """

    def __init__(
        self, ngf: int = 64, n_blocks: int = 16, groups: int = 8, *, backend: Backend = "auto"
    ) -> None:
        super().__init__()
        if ngf < 2 or ngf % 2 or n_blocks < 0 or groups < 1:
            raise ValueError(
                f"need an even ngf >= 2, n_blocks >= 0, groups >= 1; got ngf={ngf}, n_blocks={n_blocks}, "
                f"groups={groups}"
            )
        for _, _, c, _ in BRANCHES:
            if c % groups:
                raise ValueError(f"groups={groups} must divide the reference channels {c}")
        self.content_extractor = ContentExtractor(ngf, n_blocks)
        self.dyn_agg_restore = DynamicAggregationRestoration(ngf, n_blocks, groups, backend=backend)
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and not name.endswith("conv_offset_mask"):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (PreOffsetDeformConv, DynamicAggregationConv)):
                nn.init.zeros_(m.bias)

    def forward(
        self,
        lr: torch.Tensor,
        offsets: Sequence[dict[int, torch.Tensor]],
        ref_feats: Sequence[dict[str, torch.Tensor]],
        weights: torch.Tensor,
    ) -> torch.Tensor:
        with stage("amsa.restoration"):
            base = F.interpolate(lr, scale_factor=SCALE, mode="bilinear", align_corners=False)
            content = self.content_extractor(lr)
        return self.dyn_agg_restore(content, offsets, ref_feats, weights) + base
