"""The AMSA pipeline (paper Fig. 2): matching features, CFE-PatchMatch, Multi-Scale Dynamic Aggregation and
the restoration network, 4x super-resolution of an LR image with one or more HR references."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from amsa._checks import as_list, check_image, check_same
from amsa.deform import Backend
from amsa.io import resize
from amsa.matching import Match, Pyramid, cfe_patchmatch
from amsa.models.aggregation import flow_from_positions, multiscale_weights, pre_offsets
from amsa.models.checkpoints import WeightsSource, load_weights
from amsa.models.extractors import ContrasExtractorSep, VGGFeatures
from amsa.models.restoration import BRANCHES, SCALE, RestorationNet
from amsa.timing import stage

__all__ = ["AMSA", "RESIZES"]


class _ResizeModes(NamedTuple):
    """The :func:`amsa.io.resize` mode of each resize in the matching stage."""

    references: str  # the multi-scale references Ref_i
    lr_up: str  # LR-up, the finest query level
    levels: str  # the coarser pyramid levels (down 2^l, the LR side then up 4x)


#: ``AMSA(resize=...)``: the official release's conventions, or antialiased bicubic throughout.
RESIZES = {"official": _ResizeModes("pil", "pil", "torch"),
           "antialias": _ResizeModes("antialias", "antialias", "antialias")}


class AMSA(nn.Module):
    """AMSA, 4x reference-based super-resolution: ``forward(lr, ref) -> sr``.

    Args:
        ngf, n_blocks, groups: restoration width, residual blocks per branch, deformable groups of Eq. 8.
        ref_scales, scale_factor: the multi-scale references Ref_i, i < n, each the previous one resized by
            k (paper: n = 5, k = 0.8).
        iters: CFE-PatchMatch iterations per level, coarse to fine (paper (1, 1, 2, 6)).
        temperature: of the softmax over the relevance maps (Eq. 9): softmax(S_i / T). Our scores are
            cosines of patches of per-pixel-normalised features; the official softmax(10 * S) with its
            S = 3 cos of the same patches is T = 1/30.
        normalize_features: L2-normalise the finest-level matching features per pixel over channels before
            matching, as the official correspondence stage does (its coarse levels stay raw: only their
            argmax is used, which a per-pixel scale of the query does not move, and the official code
            passes them unnormalised). The official checkpoints were trained on these matches and scores.
        resize: how images are resized for matching. ``"official"`` (what the official checkpoints were
            trained and tested with): the multi-scale references and LR-up as PIL's bicubic on 8-bit
            images (the official data pipeline), the coarse pyramid levels by ``F.interpolate`` bicubic,
            no antialiasing, no clamping (the official forward). ``"antialias"``: antialiased, clamped
            bicubic everywhere (:func:`amsa.io.bicubic_resize`). Training and inference use the same.
        seed: seeds the matcher's random initialisation (deterministic inference).
        backend: "auto" | "torch" | "triton" | "numba" for matching and deformable convolutions
            (:mod:`amsa.backends`).
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
        normalize_features: bool = True,
        resize: str = "official",
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
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {sorted(RESIZES)}, got {resize!r}")
        self.normalize_features, self.resize = normalize_features, resize

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
        refs, names, _ = as_list(ref, "ref")
        min_side = SCALE * 3 * self._level_factor
        for r, name in zip(refs, names):
            check_image(r, name)
            check_same(r, name, lr, "lr")
            if r.shape[0] != lr.shape[0]:
                raise ValueError(f"{name} has batch {r.shape[0]} but lr has batch {lr.shape[0]}")
            if min(r.shape[-2:]) < min_side:
                raise ValueError(
                    f"{name} is {r.shape[-2]}x{r.shape[-1]}, smaller than the {min_side}x{min_side} the "
                    f"{len(self.iters)} matching levels need (a 3x3 patch at 1/{self._level_factor} of its "
                    f"1/{SCALE} feature map)"
                )
        return refs

    def _multiscale(self, refs: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
        """Ref_i: each reference and its ``ref_scales - 1`` successive bicubic resizes by ``scale_factor``
        (sizes floor(H * k^i), each from the previous one as the official data pipeline does, cut to
        multiples of 4), zero-padded bottom/right to ``size``."""
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
                    img = resize(img, (int(h), int(w)), RESIZES[self.resize].references)
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

    def _pyramid(self, extractor: nn.Module, images: torch.Tensor, lr: bool) -> list[torch.Tensor]:
        """Matching features of ``images`` at every level, fine to coarse: the extractor run on the images
        bicubic-downsampled by 2^l, each level from the previous one (the official release does this
        rather than pooling features). The LR side (``lr``) is bicubic-upsampled 4x first (LR-up)."""
        modes = RESIZES[self.resize]
        levels, img = [], images
        for lv in range(len(self.iters)):
            if lv > 0:
                img = resize(img, (img.shape[-2] // 2, img.shape[-1] // 2), modes.levels)
            if lr:
                up = resize(img, (SCALE * img.shape[-2], SCALE * img.shape[-1]),
                            modes.lr_up if lv == 0 else modes.levels)
            levels.append(extractor(up if lr else img))
        if self.normalize_features:
            levels[0] = F.normalize(levels[0], dim=1)
        return levels

    @torch.no_grad()
    def matching_features(self, lr_pad: torch.Tensor, scaled: list[torch.Tensor]) -> tuple[Pyramid, list]:
        """The matcher's inputs: the query :class:`Pyramid` of LR-up (``lr_pad`` [B, 3, h, w], padded) and
        one Pyramid per reference scale (``scaled``, each [B, 3, 4h, 4w]), coarse to fine; the finest
        levels per-pixel normalised when ``normalize_features``."""
        query = self._pyramid(self.matching_extractor.feature_extraction_image1, lr_pad, lr=True)
        # All reference scales share one size: one extractor call per level for all of them.
        keys = self._pyramid(self.matching_extractor.feature_extraction_image2, torch.cat(scaled), lr=False)
        B = lr_pad.shape[0]
        return (Pyramid(query[::-1]),
                [Pyramid(lv[i * B:(i + 1) * B] for lv in keys[::-1]) for i in range(len(scaled))])

    def _prepare(self, lr: torch.Tensor, ref) -> tuple[torch.Tensor, list[torch.Tensor], list[Match]]:
        """Padded LR, padded multi-scale references and their matches (features + matching stages)."""
        check_image(lr, "lr")
        refs = self._references(lr, ref)
        size = self._common_size(lr, refs)
        with stage("amsa.features"), torch.no_grad():
            lr_pad = F.pad(lr, (0, size[1] // SCALE - lr.shape[-1], 0, size[0] // SCALE - lr.shape[-2]),
                           mode="replicate")
            scaled = self._multiscale(refs, size)
            if lr.device.type == "cpu":
                # oneDNN's native layout: the convolutions skip their layout conversions, and so does the
                # deformable op (its output follows); 1.2x for the whole forward on 2 cores (bench.model).
                lr_pad = lr_pad.contiguous(memory_format=torch.channels_last)
                scaled = [s.contiguous(memory_format=torch.channels_last) for s in scaled]
            query, keys = self.matching_features(lr_pad, scaled)
        with stage("amsa.matching"):
            matches = cfe_patchmatch(query, keys, self.iters, seed=self.seed, backend=self.backend)
        return lr_pad, scaled, matches

    def match(self, lr: torch.Tensor, ref) -> list[Match]:
        """CFE-PatchMatch of LR-up against every reference scale, for inspection.

        Returns one :class:`amsa.Match` per reference scale (reference 0 scales 0..n-1, then reference
        1, ...): ``pos`` [B, h, w, 2] (y, x) on the LR grid, in the 1/4 grid of that scaled reference
        (multiply by 4 for its pixels); ``score`` [B, h, w] the relevance S_i, the cosine of the 3x3
        patches of the matching features (per-pixel normalised at this level by default; the official
        ``max_val`` is 3x it wherever the patch lies inside the map, and 0 on the map's 1-pixel border).
        """
        _, _, matches = self._prepare(lr, ref)
        h, w = lr.shape[-2:]
        return [Match(m.pos[:, :h, :w], m.score[:, :h, :w], m.flops) for m in matches]

    def forward(self, lr: torch.Tensor, ref: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """lr [B, 3, h, w] RGB in [0, 1]; ref [B, 3, H, W] in [0, 1] or a list of those -> [B, 3, 4h, 4w]."""
        lr_pad, scaled, matches = self._prepare(lr, ref)
        with stage("amsa.features"), torch.no_grad():
            content_src = [scaled[(i // self.ref_scales) * self.ref_scales] for i in range(len(scaled))] \
                if self.official_content else scaled
            feats = self.vgg(torch.cat(content_src))
            B = lr.shape[0]
            ref_feats = [{k: v[i * B:(i + 1) * B] for k, v in feats.items()} for i in range(len(scaled))]
        with stage("amsa.aggregation"), torch.no_grad():
            flows = [flow_from_positions(m.pos) for m in matches]
            offsets = [{s: pre_offsets(fl, s).to(lr.dtype) for _, _, _, s in BRANCHES} for fl in flows]
            weights = multiscale_weights([m.score for m in matches], self.temperature, SCALE).to(lr.dtype)
        sr = self.net(lr_pad, offsets, ref_feats, weights)
        return sr[..., : SCALE * lr.shape[-2], : SCALE * lr.shape[-1]].contiguous()

    def extra_repr(self) -> str:
        return (
            f"ref_scales={self.ref_scales}, scale_factor={self.scale_factor}, iters={self.iters}, "
            f"temperature={self.temperature:.4g}, seed={self.seed}, backend={self.backend!r}, "
            f"official_content={self.official_content}, normalize_features={self.normalize_features}, "
            f"resize={self.resize!r}"
        )
