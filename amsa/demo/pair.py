"""The demo's RefSR pair: :func:`demo_pair` cuts a real reference-based super-resolution pair from the
photo that matplotlib ships (``grace_hopper.jpg``, 512x600 RGB), with a known geometric mapping from HR
pixels to reference pixels (:class:`Geometry`) so that matches can be checked against the truth. Images
and the pixel-coordinate convention are those of :mod:`amsa.io`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from amsa.grid import cell_centres, grid_truth
from amsa.io import bicubic_resize, load_image, sample_photo_path

__all__ = ["DemoPair", "Geometry", "demo_pair", "grid_truth"]  # grid_truth: amsa.grid's



@dataclass(frozen=True)
class Geometry:
    """Known mapping from HR-crop pixel coordinates to reference pixel coordinates, per axis:
    ``ref = scale * hr + shift`` with ``(y, x)`` order and coordinates in pixel-index units
    (pixel ``i`` is centred at index ``i``)."""

    scale: tuple[float, float]
    shift: tuple[float, float]

    def hr_to_ref(self, coords: torch.Tensor) -> torch.Tensor:
        """Map ``[..., 2]`` HR ``(y, x)`` coordinates to reference coordinates (float)."""
        s = torch.tensor(self.scale, dtype=torch.float64, device=coords.device)
        t = torch.tensor(self.shift, dtype=torch.float64, device=coords.device)
        return (coords.to(torch.float64) * s + t).to(torch.float32)

    def ref_to_hr(self, coords: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`hr_to_ref`."""
        s = torch.tensor(self.scale, dtype=torch.float64, device=coords.device)
        t = torch.tensor(self.shift, dtype=torch.float64, device=coords.device)
        return ((coords.to(torch.float64) - t) / s).to(torch.float32)


@dataclass(frozen=True)
class DemoPair:
    """A RefSR pair cut from one photo. All images are ``[1, 3, *, *]`` float32 in ``[0, 1]``.

    Attributes:
        hr: the HR crop (ground truth), ``hr_size x hr_size``.
        lr: ``hr`` bicubic-downsampled 4x (antialiased).
        lr_up: ``lr`` bicubic-upsampled 4x, the matcher's query image (HR size).
        ref: the reference, an overlapping crop of the same photo after rescaling it by ``ref_scale``.
        ref_blur: ``ref`` down 4x then up 4x: the same blur domain as ``lr_up``, the matcher's reference.
        geometry: HR pixel -> reference pixel mapping (:class:`Geometry`).
        hr_origin: ``(y, x)`` of the HR crop's top-left pixel in the photo.
        ref_origin: ``(y, x)`` of the reference's top-left pixel in the photo rescaled by ``ref_scale``.
        ref_scale: the reference's scale relative to the HR crop (actual per-axis scales are in
            ``geometry.scale``; they differ from it by rounding of the rescaled photo's size).
        source: path of the photo.
    """

    hr: torch.Tensor
    lr: torch.Tensor
    lr_up: torch.Tensor
    ref: torch.Tensor
    ref_blur: torch.Tensor
    geometry: Geometry
    hr_origin: tuple[int, int]
    ref_origin: tuple[int, int]
    ref_scale: float
    source: str
    scale_factor: int = 4

    def true_positions(self) -> torch.Tensor:
        """``[H, W, 2]`` float32: the true reference ``(y, x)`` of every HR pixel (may lie outside the
        reference where the crops do not overlap)."""
        h, w = self.hr.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return self.geometry.hr_to_ref(torch.stack([ys, xs], dim=-1))

    def truth_cells(self, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`grid_truth` of the query (LR-up) on a grid of ``stride`` pixels per cell: ``truth``
        [H/s, W/s, 2] in reference cells and ``inside`` [H/s, W/s] (stride 1: :meth:`true_positions` and
        :meth:`overlap_mask`)."""
        centres = cell_centres((self.hr.shape[-2] // stride, self.hr.shape[-1] // stride), stride)
        s = torch.tensor(self.geometry.scale, dtype=torch.float64)
        t = torch.tensor(self.geometry.shift, dtype=torch.float64)
        return grid_truth(centres * s + t, tuple(self.ref.shape[-2:]), stride)

    def overlap_mask(self, margin: float = 1.0) -> torch.Tensor:
        """``[H, W]`` bool: HR pixels whose true reference position lies inside the reference, at least
        ``margin`` pixels from its border (``margin=1`` keeps whole 3x3 patches inside)."""
        hr_, wr = self.ref.shape[-2:]
        p = self.true_positions()
        return (
            (p[..., 0] >= margin)
            & (p[..., 0] <= hr_ - 1 - margin)
            & (p[..., 1] >= margin)
            & (p[..., 1] <= wr - 1 - margin)
        )


def demo_pair(
    hr_size: int = 256,
    *,
    ref_size: int | None = None,
    ref_scale: float = 0.8,
    shift: tuple[float, float] = (0.15, -0.2),
    center: tuple[int, int] = (230, 260),
    scale_factor: int = 4,
    path: str | os.PathLike | None = None,
) -> DemoPair:
    """Build the demo's RefSR pair from one photo (default: matplotlib's ``grace_hopper.jpg``).

    The HR crop is ``hr_size x hr_size`` photo pixels centred on ``center`` (photo ``(y, x)``; the
    default is Grace Hopper's face). The reference is a ``ref_size x ref_size`` crop (default
    ``hr_size``) of the photo bicubic-rescaled by ``ref_scale`` (antialiased when shrinking): its window
    starts centred on the HR crop's centre and is then moved by ``shift = (dy, dx)`` times ``ref_size``
    pixels, so the two crops overlap only partly, at different scales. Windows are clamped to the photo;
    the returned :class:`Geometry` is computed from the actual windows, so it is exact either way.

    ``lr`` is ``hr`` bicubic-downsampled by ``scale_factor``, ``lr_up`` its bicubic upsampling back, and
    ``ref_blur`` the reference down and up by the same factor (RefSR matches ``lr_up`` against
    ``ref_blur``, both in the same blur domain). Deterministic.
    """
    ref_size = hr_size if ref_size is None else ref_size
    for name, v in (("hr_size", hr_size), ("ref_size", ref_size)):
        if not isinstance(v, int) or v < 4 * scale_factor or v % scale_factor:
            raise ValueError(
                f"demo_pair: {name} must be a multiple of {scale_factor} and >= {4 * scale_factor}, got {v}"
            )
    if not 0.25 <= ref_scale <= 4.0:
        raise ValueError(f"demo_pair: ref_scale must be in [0.25, 4], got {ref_scale}")
    source = os.fspath(path) if path is not None else sample_photo_path()
    photo = load_image(source)
    ph, pw = photo.shape[-2:]
    if hr_size > min(ph, pw):
        raise ValueError(f"demo_pair: hr_size {hr_size} exceeds the photo ({ph}x{pw})")

    def window(c: float, size: int, limit: int) -> int:
        return int(min(max(round(c - size / 2), 0), limit - size))

    hy, hx = window(center[0], hr_size, ph), window(center[1], hr_size, pw)
    hr = photo[..., hy : hy + hr_size, hx : hx + hr_size].contiguous()

    scaled = bicubic_resize(photo, scale=ref_scale)
    sh, sw = scaled.shape[-2:]
    if ref_size > min(sh, sw):
        raise ValueError(f"demo_pair: ref_size {ref_size} exceeds the rescaled photo ({sh}x{sw})")
    sy, sx = sh / ph, sw / pw  # actual per-axis scales after rounding
    # photo coordinate p -> rescaled coordinate (p + 0.5) * s - 0.5
    cy = (hy + (hr_size - 1) / 2 + 0.5) * sy - 0.5
    cx = (hx + (hr_size - 1) / 2 + 0.5) * sx - 0.5
    ry = window(cy + 0.5 + shift[0] * ref_size, ref_size, sh)
    rx = window(cx + 0.5 + shift[1] * ref_size, ref_size, sw)
    ref = scaled[..., ry : ry + ref_size, rx : rx + ref_size].contiguous()

    # HR pixel i -> photo hy + i -> rescaled (hy + i + 0.5) * s - 0.5 -> reference that minus ry
    geometry = Geometry(
        scale=(sy, sx),
        shift=((hy + 0.5) * sy - 0.5 - ry, (hx + 0.5) * sx - 0.5 - rx),
    )
    f = scale_factor
    lr = bicubic_resize(hr, (hr_size // f, hr_size // f))
    lr_up = bicubic_resize(lr, (hr_size, hr_size))
    ref_blur = bicubic_resize(bicubic_resize(ref, (ref_size // f, ref_size // f)), (ref_size, ref_size))
    return DemoPair(
        hr=hr,
        lr=lr,
        lr_up=lr_up,
        ref=ref,
        ref_blur=ref_blur,
        geometry=geometry,
        hr_origin=(hy, hx),
        ref_origin=(ry, rx),
        ref_scale=float(ref_scale),
        source=source,
        scale_factor=f,
    )
