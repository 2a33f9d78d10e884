"""Multi-Scale Dynamic Aggregation (paper section 3.2, Eq. 6-10).

From matches to sampling offsets (:func:`pre_offsets`), the deformable convolutions of the Dynamic
Aggregation (:class:`PreOffsetDeformConv`, Eq. 6; :class:`DynamicAggregationConv`, Eq. 7-8) and the
relevance weights of the Multi-Scale Aggregation (:func:`multiscale_weights`, Eq. 9). The restoration
network that wires them together (and Eq. 10) lives in :mod:`amsa.models.restoration`.

Offsets follow the DCNv2 / ``torchvision.ops.deform_conv2d`` layout: channel ``2*(g*9 + k)`` is dy and
``2*(g*9 + k) + 1`` is dx of tap k = 3*(dy_k + 1) + (dx_k + 1) of deformable group g.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amsa.deform import Backend, ModulatedDeformConv2d
from amsa.matching.schedule import TAPS

__all__ = [
    "DynamicAggregationConv",
    "PreOffsetDeformConv",
    "flow_from_positions",
    "multiscale_weights",
    "pre_offsets",
]


def flow_from_positions(pos: torch.Tensor) -> torch.Tensor:
    """The paper's p0 = H_p - p: matched position minus own position.

    pos: int64 [B, h, w, 2] (y, x) in the reference feature grid (a :class:`amsa.Match` ``pos``) ->
    float32 [B, 2, h, w] flow (dy, dx). Assumes the query and reference grids share their pixel pitch
    (the model pads both to one size).
    """
    if pos.dim() != 4 or pos.shape[-1] != 2:
        raise ValueError(f"pos must be [B, h, w, 2] (y, x) positions, got {tuple(pos.shape)}")
    _, h, w, _ = pos.shape
    ys = torch.arange(h, device=pos.device).view(1, h, 1)
    xs = torch.arange(w, device=pos.device).view(1, 1, w)
    return torch.stack((pos[..., 0] - ys, pos[..., 1] - xs), dim=1).float()


def pre_offsets(flow: torch.Tensor, scale: int) -> torch.Tensor:
    """Per-tap DCN offsets at a feature scale ``scale`` (1, 2, 4) from the matching flow.

    flow: [B, 2, h, w] (dy, dx) at the matching resolution -> [B, 18, scale*h, scale*w] with

        offset_k(P) = scale * flow(floor(P / scale) - d_k),  zero where floor(P / scale) - d_k is off the map,

    for the tap d_k = (dy_k, dx_k) in {-1, 0, 1}^2: tap k samples the reference at P + d_k + offset_k(P).
    This is the official release's construction (C2-Matching's shifted flows; its checkpoints are trained
    with it): every tap follows the match of the matching pixel it reaches from the other side, so for a
    constant flow t the DCN samples the 3x3 neighbourhood of P + scale*t. The paper's Eq. 6 writes one p0
    for all taps; the two agree wherever the flow is locally constant.
    """
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be [B, 2, h, w] (dy, dx), got {tuple(flow.shape)}")
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    _, _, h, w = flow.shape
    padded = F.pad(flow, (1, 1, 1, 1))
    # padded[1 + y - dy, 1 + x - dx] = flow(y - dy, x - dx): one shifted window per tap.
    taps = [padded[:, :, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w] for dy, dx in TAPS]
    offsets = torch.cat(taps, dim=1) * scale
    if scale > 1:
        offsets = offsets.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return offsets


def multiscale_weights(scores: list[torch.Tensor], temperature: float, scale: int = 4) -> torch.Tensor:
    """Eq. 9: S'_i = softmax_i(S_i / temperature), nearest-upsampled ``scale`` x to the 4x feature grid.

    scores: n maps [B, h, w] of cosine relevance (:class:`amsa.Match` ``score``) -> [B, n, scale*h, scale*w].
    The official code computes softmax(10 * 3cos) = softmax(30 cos), i.e. temperature 1/30 on our scores.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weights = torch.softmax(torch.stack(scores, dim=1) / temperature, dim=1)
    return weights.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class PreOffsetDeformConv(ModulatedDeformConv2d):
    """Eq. 6, the standard aggregated reference feature Y'(p) = sum_j w_j m_j V(p + p_j + pre_offset_j(p)).

    ``forward(V [B, C, H, W], pre_offset [B, 18, H, W]) -> [B, C_out, H, W]``: the offsets are exactly the
    matching offsets; the modulation m = sigmoid(conv_offset_mask(V)) (9 channels, zero-initialised so it
    starts at 1/2). Official name: ``*_deform_conv`` (``DCN_pre_offset``).
    """

    def __init__(self, in_channels: int, out_channels: int, *, backend: Backend = "auto") -> None:
        super().__init__(in_channels, out_channels, 3, padding=1, backend=backend)
        self.conv_offset_mask = _zero(nn.Conv2d(in_channels, 9, 3, padding=1))

    def forward(self, ref_feat: torch.Tensor, pre_offset: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        mask = torch.sigmoid(self.conv_offset_mask(ref_feat))
        return super().forward(ref_feat, pre_offset.to(ref_feat.dtype), mask)


class DynamicAggregationConv(ModulatedDeformConv2d):
    """Eq. 8, Y(p) = sum_j w_j m_j V(p + p_j + pre_offset_j(p) + dP_j(p)) with ``groups`` deformable groups.

    ``forward(V [B, C, H, W], offset_feat [B, C, H, W], pre_offset [B, 18, H, W]) -> [B, C_out, H, W]``:
    ``conv_offset_mask(offset_feat)`` gives 27*groups channels, split in thirds: two halves of the learned
    offset dP (DCNv2 layout) and the modulation logits; the matching offsets are repeated over the groups.
    Zero-initialised, so training starts from the matched positions. Official name ``*_dyn_agg``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, groups: int, *, backend: Backend = "auto"
    ) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1, backend=backend)
        self.deformable_groups = groups
        self.conv_offset_mask = _zero(nn.Conv2d(in_channels, 27 * groups, 3, padding=1))

    def forward(  # type: ignore[override]
        self, ref_feat: torch.Tensor, offset_feat: torch.Tensor, pre_offset: torch.Tensor
    ) -> torch.Tensor:
        o1, o2, mask = torch.chunk(self.conv_offset_mask(offset_feat), 3, dim=1)
        matched = pre_offset.to(ref_feat.dtype).repeat(1, self.deformable_groups, 1, 1)
        offset = torch.cat((o1, o2), dim=1) + matched
        return super().forward(ref_feat, offset, torch.sigmoid(mask))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, deformable_groups={self.deformable_groups}"
