"""Features of (LR-up, reference) pairs for matching outside the AMSA model: the fixed filter bank, and
:class:`MatchingFeatures` (the learned extractor or the filter bank on a matching grid), used by the demo,
the figure scripts and the matching extractor's validation.

:class:`FilterBankExtractor` is the demo's fixed feature extractor: a bank of Gaussian-derivative filters
(no downloaded weights, nothing trained). The paper matches with a contrastively trained extractor (C2-
Matching's VGG-style network); any ``nn.Module`` mapping ``[B, 3, H, W]`` images to ``[B, C, H, W]``
features can take this one's place in :func:`amsa.demo.run.run_demo`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FilterBankExtractor", "MatchingFeatures", "default_matching_features", "down_up"]

# BT.601 luma and two colour-opponent axes (red-green, yellow-blue), rows act on (R, G, B).
_COLOUR_MATRIX = (
    (0.299, 0.587, 0.114),  # Y
    (0.5, -0.5, 0.0),  # RG = (R - G) / 2
    (0.25, 0.25, -0.5),  # BY = (R + G) / 4 - B / 2
)


def _gaussian_kernels(sigma: float, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-D sampled Gaussian and its first and second derivatives, radius ceil(3 sigma). The Gaussian
    sums to 1; the derivative kernels are exact on linear / quadratic ramps (moment-corrected)."""
    r = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-r, r + 1, dtype=dtype)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    d1 = x * g  # derivative of the Gaussian, flipped for correlation: out(p) = sum_x k(x) f(p + x)
    d1 = d1 / (d1 * x).sum()  # response 1 to a unit ramp f(p) = p
    d2 = (x**2 / sigma**4 - 1.0 / sigma**2) * g
    d2 = d2 - d2.sum() * g  # no response to constants
    d2 = d2 / (d2 * x**2).sum() * 2.0  # response 2 to x^2, i.e. d2 f / dx2 on quadratics
    return g, d1, d2


class FilterBankExtractor(nn.Module):
    """Fixed 64-channel matching features: oriented Gaussian derivatives of luminance at four scales plus
    smoothed colour-opponent channels. No learned or downloaded weights; deterministic.

    Input ``[B, 3, H, W]`` RGB in ``[0, 1]`` (any float dtype, any device); output ``[B, 64, H, W]`` at the
    input resolution, in the input's dtype. The image is converted to luma ``Y`` (BT.601) and two
    opponent channels ``RG = (R - G) / 2`` and ``BY = (R + G) / 4 - B / 2``. Channels, for the default
    ``sigmas = (1, 2, 4, 8)``:

    * ``0 .. 47`` luminance, 12 per scale sigma, orientations theta = 0, 45, 90, 135 degrees:
      first derivative along theta (edges, odd phase; ``sigma * dY/du``), second derivative along theta
      (bars/ridges, even phase; ``sigma^2 * d2Y/du2``) and oriented energy ``sqrt(odd^2 + even^2)``
      (phase-invariant). Derivatives are steered from separable Gaussian-derivative filters and
      scale-normalised (Lindeberg's gamma = 1), so scales are comparable. Channel ``12 i + 3 a + k`` is
      scale ``i``, orientation ``a`` and ``k`` = 0 odd, 1 even, 2 energy.
    * ``48 .. 55`` colour: ``RG`` and ``BY`` smoothed by a Gaussian of each sigma (local chroma), in the
      order (RG, BY) per scale.
    * ``56 .. 63`` colour edges: ``sigma * d/dx`` then ``sigma * d/dy`` of (RG, BY), at the two middle
      sigmas.

    Normalisation (``normalize="image"``, default): every channel of every image is standardised with that
    image's own spatial mean and standard deviation, ``(f - mean) / max(std, floor)``, with
    ``floor = 1e-2`` so nearly constant channels (e.g. chroma of a grey image) stay near zero instead of
    amplifying noise. Nothing is shared across the batch, so an image's features do not depend on the
    others in the batch. Then each group is weighted so that luminance carries 3/4 and colour 1/4 of the
    expected squared norm. ``normalize="none"`` returns the raw scale-normalised responses.

    Borders are padded by edge replication. Computation runs in float32 (float64 for float64 inputs);
    the result is cast back to the input dtype.
    """

    out_channels: int = 64

    def __init__(
        self,
        sigmas: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
        *,
        normalize: str = "image",
        std_floor: float = 1e-2,
    ):
        super().__init__()
        sigmas = tuple(float(s) for s in sigmas)
        if len(sigmas) != 4 or any(not s > 0 for s in sigmas):
            raise ValueError(f"FilterBankExtractor: sigmas must be 4 positive scales, got {sigmas}")
        if normalize not in ("image", "none"):
            raise ValueError(f"FilterBankExtractor: normalize must be 'image' or 'none', got {normalize!r}")
        self.sigmas = sigmas
        self.normalize = normalize
        self.std_floor = float(std_floor)
        colour = torch.tensor(_COLOUR_MATRIX, dtype=torch.float64)
        self.register_buffer("colour_matrix", colour, persistent=False)
        for i, s in enumerate(sigmas):
            g, d1, d2 = _gaussian_kernels(s)
            # rows: (g, d1, d2) as 1-D kernels of one common length per scale
            self.register_buffer(f"k{i}", torch.stack([g, d1, d2]), persistent=False)
        n_lum = 12 * len(sigmas)
        weights = torch.cat(
            [torch.full((n_lum,), math.sqrt(0.75 / n_lum)), torch.full((16,), math.sqrt(0.25 / 16))]
        )
        self.register_buffer("channel_weights", weights.to(torch.float64), persistent=False)

    def extra_repr(self) -> str:
        return f"sigmas={self.sigmas}, normalize={self.normalize!r}, out_channels={self.out_channels}"

    @staticmethod
    def _sep(x: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
        """Separable correlation of every channel of x [B, C, H, W] with ky (vertical) then kx."""
        c = x.shape[1]
        r = ky.numel() // 2
        x = F.pad(x, (0, 0, r, r), mode="replicate")
        x = F.conv2d(x, ky.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        x = F.pad(x, (r, r, 0, 0), mode="replicate")
        return F.conv2d(x, kx.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"FilterBankExtractor: expected a torch.Tensor, got {type(img).__name__}")
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(
                f"FilterBankExtractor: expected an RGB batch [B, 3, H, W], got {list(img.shape)}"
            )
        if not img.is_floating_point():
            raise TypeError(
                f"FilterBankExtractor: expected a floating-point image in [0, 1], got {img.dtype} "
                "(convert with img.float() / 255)"
            )
        if img.shape[0] == 0 or img.shape[2] == 0 or img.shape[3] == 0:
            raise ValueError(f"FilterBankExtractor: empty input {list(img.shape)}")
        out_dtype = img.dtype
        dt = torch.float64 if img.dtype == torch.float64 else torch.float32
        x = img.to(dt)
        m = self.colour_matrix.to(device=x.device, dtype=dt)
        yc = torch.einsum("oc,bchw->bohw", m, x)  # [B, 3, H, W]: Y, RG, BY
        lum, col = yc[:, :1], yc[:, 1:]

        lum_feats, col_smooth, col_edges = [], [], []
        angles = [math.radians(a) for a in (0.0, 45.0, 90.0, 135.0)]
        for i, s in enumerate(self.sigmas):
            g, d1, d2 = getattr(self, f"k{i}").to(device=x.device, dtype=dt)
            ly = self._sep(lum, d1, g)  # dY/dy
            lx = self._sep(lum, g, d1)  # dY/dx
            lyy = self._sep(lum, d2, g)
            lxx = self._sep(lum, g, d2)
            lxy = self._sep(lum, d1, d1)
            for a in angles:
                c, sn = math.cos(a), math.sin(a)
                odd = s * (c * lx + sn * ly)
                even = s * s * (c * c * lxx + 2 * c * sn * lxy + sn * sn * lyy)
                lum_feats += [odd, even, torch.sqrt(odd * odd + even * even + 1e-12)]
            col_smooth.append(self._sep(col, g, g))
            if i in (1, 2):
                col_edges += [s * self._sep(col, g, d1), s * self._sep(col, d1, g)]
        feats = torch.cat(lum_feats + col_smooth + col_edges, dim=1)
        if self.normalize == "image":
            mean = feats.mean(dim=(2, 3), keepdim=True)
            std = feats.std(dim=(2, 3), keepdim=True, correction=0) if feats[0, 0].numel() > 1 else None
            feats = feats - mean
            if std is not None:
                feats = feats / std.clamp_min(self.std_floor)
            feats = feats * self.channel_weights.to(device=x.device, dtype=dt).view(1, -1, 1, 1)
        return feats.to(out_dtype)


def down_up(img: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Bicubic down by ``factor`` and back up to the same size: the blur domain of LR-up, where matching
    on hand-made features compares a reference with LR-up (applied to references as to the HR image)."""
    from amsa.io import bicubic_resize

    h, w = img.shape[-2:]
    return bicubic_resize(bicubic_resize(img, (max(1, h // factor), max(1, w // factor))), (h, w))


class MatchingFeatures(nn.Module):
    """Features of an (LR-up, reference) pair on a matching grid of ``stride`` image pixels per cell:
    ``forward(lr_up [B, 3, H, W], ref [B, 3, Hr, Wr]) -> (K [B, C, H/s, W/s], Q [B, C, Hr/s, Wr/s])``.

    * ``MatchingFeatures.learned(extractor)``: a :class:`amsa.models.ContrasExtractorSep` (its LR branch on
      LR-up, its reference branch on the sharp reference, as AMSA matches), stride 4, every cell's
      descriptor L2-normalised (the contrastive loss trains normalised descriptors);
    * ``MatchingFeatures.filter_bank(stride)``: :class:`FilterBankExtractor` on LR-up and on the reference
      taken 4x down and up (the same blur domain), averaged over ``stride x stride`` cells (stride 4: the
      grid AMSA matches on; 1: the full-resolution features of the demo).
    """

    def __init__(self, lr_branch: nn.Module, ref_branch: nn.Module, stride: int, name: str, *,
                 blur_ref: bool = False, pool: int = 1, normalise: bool = False):
        super().__init__()
        self.lr_branch, self.ref_branch = lr_branch, ref_branch
        self.stride, self.name, self.blur_ref = stride, name, blur_ref
        self.pool, self.normalise = pool, normalise

    @classmethod
    def learned(cls, extractor: nn.Module, name: str = "learned") -> MatchingFeatures:
        return cls(extractor.feature_extraction_image1, extractor.feature_extraction_image2, 4, name,
                   normalise=True)

    @classmethod
    def filter_bank(cls, stride: int = 4) -> MatchingFeatures:
        bank = FilterBankExtractor()
        return cls(bank, bank, stride, "filter bank", blur_ref=True, pool=stride)

    def _side(self, branch: nn.Module, img: torch.Tensor) -> torch.Tensor:
        f = branch(img)
        if self.pool > 1:
            f = F.avg_pool2d(f, self.pool)
        return F.normalize(f, dim=1) if self.normalise else f

    def forward(self, lr_up: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ref = down_up(ref) if self.blur_ref else ref
        return self._side(self.lr_branch, lr_up), self._side(self.ref_branch, ref)


def default_matching_features() -> MatchingFeatures:
    """The features the demo and the figure scripts use unless told otherwise: the matching extractor
    trained in this repository and shipped with the package (``ContrasExtractorSep(weights="@learned")``,
    stride 4), which matches held-out pairs better than the filter bank (README, "Training the matching
    extractor"); the filter bank at full resolution where those weights are not installed."""
    import os

    from amsa.models.extractors import LEARNED, LEARNED_FEATURE_WEIGHTS, ContrasExtractorSep

    if not os.path.isfile(LEARNED_FEATURE_WEIGHTS):
        return MatchingFeatures.filter_bank(stride=1)
    return MatchingFeatures.learned(ContrasExtractorSep(weights=LEARNED), "learned (@learned)")
