"""The AMSA network (paper Fig. 2): matching features, CFE-PatchMatch, Multi-Scale Dynamic Aggregation and
the restoration network, 4x super-resolution of an LR image with one or more HR references.

:class:`RestorationNet` keeps the official module names, so ``restoration_mse.pth`` / ``restoration.pth``
load into ``AMSA.net`` with ``strict=True`` (9,676,454 parameters at the default size).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from amsa.aggregation import (
    DynamicAggregationConv,
    PreOffsetDeformConv,
    flow_from_positions,
    multiscale_weights,
    pre_offsets,
)
from amsa.checkpoints import WeightsSource, load_weights
from amsa.deform import Backend
from amsa.extractors import ContrasExtractorSep, VGGFeatures
from amsa.images import bicubic_resize
from amsa.patchmatch import Match, Pyramid, cfe_patchmatch

__all__ = ["AMSA", "ContentExtractor", "DynamicAggregationRestoration", "ResidualBlockNoBN", "RestorationNet"]

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
                with record_function("amsa.aggregation"):
                    aggregated = self.dynamic_aggregation(name, x, feats[layer], offset[scale])
                with record_function("amsa.restoration"):
                    head, body = getattr(self, f"head_{name}"), getattr(self, f"body_{name}")
                    h = body(head(torch.cat([x, aggregated], 1))) + x
                    if name != "large":
                        x = getattr(self, f"tail_{name}")(h)
            with record_function("amsa.aggregation"):
                weighted = h * weights[:, i:i + 1]  # Eq. 10: sum_i Y_i-restored * S'_i
                fused = weighted if fused is None else fused + weighted
        with record_function("amsa.restoration"):
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
        with record_function("amsa.restoration"):
            base = F.interpolate(lr, scale_factor=SCALE, mode="bilinear", align_corners=False)
            content = self.content_extractor(lr)
        return self.dyn_agg_restore(content, offsets, ref_feats, weights) + base


def _check_image(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an RGB image batch [B, 3, H, W] in [0, 1], got {got}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point image in [0, 1], got {x.dtype}")
    return x


class AMSA(nn.Module):
    """AMSA, 4x reference-based super-resolution: ``forward(lr, ref) -> sr``.

    Args:
        ngf, n_blocks, groups: restoration width, residual blocks per branch, deformable groups of Eq. 8.
        ref_scales, scale_factor: the multi-scale references Ref_i, i < n, each the previous one resized by
            k (paper: n = 5, k = 0.8).
        iters: CFE-PatchMatch iterations per level, coarse to fine (paper (1, 1, 2, 6)).
        temperature: of the softmax over the relevance maps (Eq. 9): softmax(S_i / T). Our scores are true
            cosines; the official softmax(10 * 3cos) is T = 1/30.
        seed: seeds the matcher's random initialisation (deterministic inference).
        backend: "auto" | "torch" | "triton" for matching and deformable convolutions.
        weights: official ``restoration*.pth`` (local path or state dict) for ``net``.
        feature_weights: official ``feature_extraction.pth`` for ``matching_extractor``.
        vgg_weights: VGG19 weights for ``vgg``, torchvision format (``features.N.weight``) or official names.
        official_content: take the content features V_i of every scale from the unscaled reference, as the
            official code does (its flows come from the scaled references); the paper takes V_i from Ref_i.

    Submodules: ``net`` (:class:`RestorationNet`, the only trained part), ``matching_extractor``
    (:class:`ContrasExtractorSep`, frozen) and ``vgg`` (VGG19 to relu3_1, frozen). Missing weights are
    replaced by random ones with a warning.

    Sizes: the LR image is padded (replicate) and every reference zero-padded, bottom/right, to one common
    size whose LR side is a multiple of 2^(levels-1) and at least 3 * 2^(levels-1) (the coarsest matching
    level needs a 3x3 patch); the output is cropped back to 4h x 4w. Each reference must be at least
    4 * 3 * 2^(levels-1) pixels on each side (96 for 4 levels).
    """

    def __init__(
        self,
        *,
        ngf: int = 64,
        n_blocks: int = 16,
        groups: int = 8,
        ref_scales: int = 5,
        scale_factor: float = 0.8,
        iters: Sequence[int] = (1, 1, 2, 6),
        temperature: float = 1 / 30,
        seed: int = 0,
        backend: Backend = "auto",
        weights: WeightsSource | None = None,
        feature_weights: WeightsSource | None = None,
        vgg_weights: WeightsSource | None = None,
        official_content: bool = False,
    ) -> None:
        super().__init__()
        if ref_scales < 1:
            raise ValueError(f"ref_scales must be >= 1, got {ref_scales}")
        if not 0 < scale_factor <= 1:
            raise ValueError(f"scale_factor must be in (0, 1], got {scale_factor}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.iters = tuple(int(n) for n in iters)
        if not self.iters:
            raise ValueError("iters must name at least one level")
        self.ref_scales, self.scale_factor = ref_scales, scale_factor
        self.temperature, self.seed, self.backend = temperature, seed, backend
        self.official_content = official_content

        self.net = RestorationNet(ngf, n_blocks, groups, backend=backend)
        if weights is None:
            warnings.warn(
                "AMSA: no restoration weights given, the network is RANDOM; pass weights= (a local "
                "restoration_mse.pth / restoration.pth) for meaningful outputs",
                stacklevel=2,
            )
        else:
            load_weights(self.net, weights, what="AMSA restoration weights")
        self.matching_extractor = ContrasExtractorSep(weights=feature_weights)
        self.vgg = VGGFeatures("vgg19", ("relu1_1", "relu2_1", "relu3_1"), weights=vgg_weights)
        self.train()

    def train(self, mode: bool = True) -> AMSA:
        """Only ``net`` switches mode: the frozen extractors stay in eval mode."""
        super().train(mode)
        self.matching_extractor.eval()
        self.vgg.eval()
        return self

    # ------------------------------------------------------------------------------------------------------
    # Stages

    @property
    def _level_factor(self) -> int:
        return 2 ** (len(self.iters) - 1)

    def _references(self, lr: torch.Tensor, ref: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        refs = list(ref) if isinstance(ref, (list, tuple)) else [ref]
        if not refs:
            raise ValueError("ref is an empty list: give at least one reference image")
        min_side = SCALE * 3 * self._level_factor
        for i, r in enumerate(refs):
            name = f"ref[{i}]" if isinstance(ref, (list, tuple)) else "ref"
            _check_image(r, name)
            if r.shape[0] != lr.shape[0] or r.device != lr.device or r.dtype != lr.dtype:
                raise ValueError(
                    f"{name} must match lr in batch, device and dtype: got {tuple(r.shape)} {r.device} "
                    f"{r.dtype}, lr {tuple(lr.shape)} {lr.device} {lr.dtype}"
                )
            if min(r.shape[-2:]) < min_side:
                raise ValueError(
                    f"{name} is {r.shape[-2]}x{r.shape[-1]}, smaller than the {min_side}x{min_side} the "
                    f"{len(self.iters)} matching levels need (a 3x3 patch at 1/{self._level_factor} of its "
                    f"1/{SCALE} feature map)"
                )
        return refs

    def _multiscale(self, refs: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
        """Ref_i: each reference and its ``ref_scales - 1`` successive bicubic resizes by ``scale_factor``
        (sizes floor(H * k^i), cut to multiples of 4), zero-padded bottom/right to ``size``."""
        out = []
        for r in refs:
            img, (h, w) = r, (float(r.shape[-2]), float(r.shape[-1]))
            for i in range(self.ref_scales):
                if i > 0:
                    h, w = h * self.scale_factor, w * self.scale_factor
                    if int(h) < SCALE or int(w) < SCALE:
                        raise ValueError(
                            f"ref of {tuple(r.shape[-2:])} shrinks below {SCALE} pixels at scale {i} "
                            f"(ref_scales={self.ref_scales}, scale_factor={self.scale_factor})"
                        )
                    img = bicubic_resize(img, (int(h), int(w)))
                cut = img[..., : img.shape[-2] // SCALE * SCALE, : img.shape[-1] // SCALE * SCALE]
                out.append(F.pad(cut, (0, size[1] - cut.shape[-1], 0, size[0] - cut.shape[-2])))
        return out

    def _common_size(self, lr: torch.Tensor, refs: list[torch.Tensor]) -> tuple[int, int]:
        """HR size every image is padded to: covers LR-up and every reference, LR side a multiple of the
        level factor f and at least 3f."""
        f = self._level_factor
        size = []
        for dim in (-2, -1):
            lr_side = max(lr.shape[dim], *(math.ceil(r.shape[dim] / SCALE) for r in refs), 3 * f)
            size.append(SCALE * math.ceil(lr_side / f) * f)
        return size[0], size[1]

    def _pyramid(self, extractor: nn.Module, images: torch.Tensor, upsample: bool) -> Pyramid:
        """Matching features of ``images`` at every level, coarse to fine: the extractor run on the images
        bicubic-downsampled by 2^l (the official release does this rather than pooling features). The LR
        side (``upsample``) is bicubic-upsampled 4x first (LR-up)."""
        levels, img = [], images
        for lv in range(len(self.iters)):
            if lv > 0:
                img = bicubic_resize(img, (img.shape[-2] // 2, img.shape[-1] // 2))
            up = bicubic_resize(img, (SCALE * img.shape[-2], SCALE * img.shape[-1])) if upsample else img
            levels.append(extractor(up))
        return Pyramid(levels[::-1])

    def _prepare(self, lr: torch.Tensor, ref) -> tuple[torch.Tensor, list[torch.Tensor], list[Match]]:
        """Padded LR, padded multi-scale references and their matches (features + matching stages)."""
        _check_image(lr, "lr")
        refs = self._references(lr, ref)
        size = self._common_size(lr, refs)
        with record_function("amsa.features"), torch.no_grad():
            lr_pad = F.pad(lr, (0, size[1] // SCALE - lr.shape[-1], 0, size[0] // SCALE - lr.shape[-2]),
                           mode="replicate")
            scaled = self._multiscale(refs, size)
            query = self._pyramid(self.matching_extractor.feature_extraction_image1, lr_pad, upsample=True)
            # All reference scales share one size: one extractor call per level for all of them.
            keys = self._pyramid(self.matching_extractor.feature_extraction_image2, torch.cat(scaled), False)
            n, B = len(scaled), lr.shape[0]
            keys = [Pyramid(lv[i * B:(i + 1) * B] for lv in keys) for i in range(n)]
        with record_function("amsa.matching"):
            matches = cfe_patchmatch(query, keys, self.iters, seed=self.seed, backend=self.backend)
        return lr_pad, scaled, matches

    def match(self, lr: torch.Tensor, ref) -> list[Match]:
        """CFE-PatchMatch of LR-up against every reference scale, for inspection.

        Returns one :class:`amsa.Match` per reference scale (reference 0 scales 0..n-1, then reference
        1, ...): ``pos`` [B, h, w, 2] (y, x) on the LR grid, in the 1/4 grid of that scaled reference
        (multiply by 4 for its pixels); ``score`` [B, h, w] cosine relevance S_i.
        """
        _, _, matches = self._prepare(lr, ref)
        h, w = lr.shape[-2:]
        return [Match(m.pos[:, :h, :w], m.score[:, :h, :w], m.flops) for m in matches]

    def forward(self, lr: torch.Tensor, ref: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """lr [B, 3, h, w] RGB in [0, 1]; ref [B, 3, H, W] in [0, 1] or a list of those -> [B, 3, 4h, 4w]."""
        lr_pad, scaled, matches = self._prepare(lr, ref)
        with record_function("amsa.features"), torch.no_grad():
            content_src = [scaled[(i // self.ref_scales) * self.ref_scales] for i in range(len(scaled))] \
                if self.official_content else scaled
            feats = self.vgg(torch.cat(content_src))
            B = lr.shape[0]
            ref_feats = [{k: v[i * B:(i + 1) * B] for k, v in feats.items()} for i in range(len(scaled))]
        with record_function("amsa.aggregation"), torch.no_grad():
            flows = [flow_from_positions(m.pos) for m in matches]
            offsets = [{s: pre_offsets(fl, s).to(lr.dtype) for _, _, _, s in BRANCHES} for fl in flows]
            weights = multiscale_weights([m.score for m in matches], self.temperature, SCALE).to(lr.dtype)
        sr = self.net(lr_pad, offsets, ref_feats, weights)
        return sr[..., : SCALE * lr.shape[-2], : SCALE * lr.shape[-1]]

    def extra_repr(self) -> str:
        return (
            f"ref_scales={self.ref_scales}, scale_factor={self.scale_factor}, iters={self.iters}, "
            f"temperature={self.temperature:.4g}, seed={self.seed}, backend={self.backend!r}, "
            f"official_content={self.official_content}"
        )
