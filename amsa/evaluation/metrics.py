"""Image quality metrics as RefSR papers report them: PSNR and SSIM on the Y channel.

The protocol of the official AMSA / C2-Matching evaluation (and of MATLAB): the SR output is quantised to
8-bit levels (as saved to PNG), both images are converted to luma with MATLAB's ``rgb2ycbcr`` (BT.601,
studio range: ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for ``R, G, B`` in ``[0, 1]``, so ``Y`` lies in
``[16, 235]``, kept in floating point), ``crop_border`` pixels are removed on every side, and

* PSNR = ``10 log10(255^2 / MSE)`` (``inf`` for identical images);
* SSIM (Wang et al. 2004) with an 11x11 Gaussian window of sigma 1.5, ``C1 = (0.01 * 255)^2``,
  ``C2 = (0.03 * 255)^2``, local statistics over 'valid' windows only (no padding), averaged over the map.

Everything is computed in float64, per image of a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amsa.io import quantize_8bit

__all__ = ["psnr", "quantize_8bit", "rgb_to_y", "ssim"]

# MATLAB rgb2ycbcr, Y row, for RGB in [0, 1] -> Y in [16, 235].
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def _check_pair(sr: torch.Tensor, hr: torch.Tensor, name: str) -> None:
    for arg, t in (("sr", sr), ("hr", hr)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 3:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {arg} must be an RGB batch [B, 3, H, W], got {got}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {arg} must be a floating-point tensor in [0, 1], got {t.dtype}")
    if sr.shape != hr.shape:
        raise ValueError(
            f"{name}: sr and hr must have the same shape, got {list(sr.shape)} and {list(hr.shape)}"
        )


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """MATLAB ``rgb2ycbcr`` luma of ``[B, 3, H, W]`` RGB in ``[0, 1]``: ``[B, 1, H, W]`` float64 in
    ``[16, 235]`` (0-255 scale, not rounded)."""
    if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[1] != 3:
        got = list(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"rgb_to_y: img must be an RGB batch [B, 3, H, W], got {got}")
    w = torch.tensor(_Y_WEIGHTS, dtype=torch.float64, device=img.device).view(1, 3, 1, 1)
    return (img.to(torch.float64) * w).sum(dim=1, keepdim=True) + _Y_OFFSET


def _y_cropped(sr: torch.Tensor, hr: torch.Tensor, crop_border: int, name: str) -> tuple[torch.Tensor, ...]:
    _check_pair(sr, hr, name)
    if crop_border < 0:
        raise ValueError(f"{name}: crop_border must be >= 0, got {crop_border}")
    h, w = sr.shape[-2:]
    if h <= 2 * crop_border or w <= 2 * crop_border:
        raise ValueError(
            f"{name}: images of {h}x{w} leave nothing after cropping {crop_border} pixels per side"
        )
    ys = [rgb_to_y(t) for t in (sr, hr)]
    if crop_border:
        ys = [y[..., crop_border:-crop_border, crop_border:-crop_border] for y in ys]
    return tuple(ys)


def psnr(sr: torch.Tensor, hr: torch.Tensor, *, crop_border: int = 4) -> torch.Tensor:
    """PSNR in dB on the Y channel, per image: ``[B]`` float64 (``inf`` where the crops are identical).

    ``sr``, ``hr``: ``[B, 3, H, W]`` RGB in ``[0, 1]``; quantise ``sr`` with :func:`quantize_8bit` first to
    follow the published protocol.
    """
    y_sr, y_hr = _y_cropped(sr, hr, crop_border, "psnr")
    mse = (y_sr - y_hr).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0**2 / mse)  # mse == 0 gives +inf


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(sr: torch.Tensor, hr: torch.Tensor, *, crop_border: int = 4) -> torch.Tensor:
    """SSIM on the Y channel, per image: ``[B]`` float64 (1 for identical images).

    ``SSIM = mean over valid 11x11 windows of (2 mu_x mu_y + C1)(2 sigma_xy + C2) /
    ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))`` with Gaussian-weighted (sigma 1.5) statistics.
    """
    y_sr, y_hr = _y_cropped(sr, hr, crop_border, "ssim")
    if min(y_sr.shape[-2:]) < 11:
        raise ValueError(
            f"ssim: the cropped Y images ({list(y_sr.shape[-2:])}) are smaller than the 11x11 window"
        )
    window = _gaussian_window().to(y_sr.device).view(1, 1, 11, 11)
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)  # 'valid' windows, as MATLAB's filter2(..., 'valid')

    mu_x, mu_y = local_mean(y_sr), local_mean(y_hr)
    var_x = local_mean(y_sr * y_sr) - mu_x**2
    var_y = local_mean(y_hr * y_hr) - mu_y**2
    cov = local_mean(y_sr * y_hr) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))
