"""Files in and out: images (read, write, bicubic resizing), JSON documents and atomic writes.

Images are float tensors ``[1, 3, H, W]`` with values in ``[0, 1]`` (RGB). Pixel-coordinate convention
(as in ``F.interpolate(..., align_corners=False)``): pixel ``i`` covers ``[i, i + 1)`` and its centre is
``i + 0.5``; resizing a length ``n`` to ``m`` maps output pixel ``j`` to input coordinate
``(j + 0.5) * n / m - 0.5``.

Outputs that must never be left half-written go through :func:`atomic_write` (a temporary file renamed
into place): :func:`write_json` does, and callers wrap :func:`save_image`, tables and checkpoints in it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "RESIZE_MODES",
    "append_jsonl",
    "atomic_write",
    "bicubic_resize",
    "load_image",
    "quantize_8bit",
    "read_json",
    "resize",
    "sample_photo_path",
    "save_image",
    "write_json",
]

#: Bicubic resizing conventions of :func:`resize`.
RESIZE_MODES = ("antialias", "pil", "torch")

# PIL modes that convert to RGB without losing meaning. Alpha is composited onto white.
_CONVERTIBLE_MODES = {
    "RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV",
}


def sample_photo_path() -> str:
    """Path of ``grace_hopper.jpg`` (512x600 RGB), the photo matplotlib ships as sample data."""
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file into a float32 tensor ``[1, 3, H, W]`` in ``[0, 1]``.

    Greyscale (``L``, ``1``), palette (``P``), ``CMYK`` and ``YCbCr`` images are converted to RGB; images
    with an alpha channel (``RGBA``, ``LA``, ``PA``) are composited onto a white background.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not an image PIL can read, or its mode (e.g. 16-bit or float ``I``/``F``)
            has no faithful 8-bit RGB conversion.
    """
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_image: no such file: {path!r}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in _CONVERTIBLE_MODES:
                raise ValueError(
                    f"load_image: {path!r} has PIL mode {mode!r}, which has no faithful 8-bit RGB "
                    "conversion; convert it to RGB, RGBA or L first"
                )
            if mode in ("RGBA", "LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, rgba).convert("RGB")
            else:
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8).copy()
    except UnidentifiedImageError as exc:
        raise ValueError(f"load_image: {path!r} is not an image file PIL can read") from exc
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def _as_chw(img: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(img).__name__}")
    if img.dim() == 4:
        if img.shape[0] != 1:
            raise ValueError(f"{name}: expected one image [1, C, H, W], got batch of {img.shape[0]}")
        img = img[0]
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(
            f"{name}: expected [1, 3, H, W], [3, H, W], [1, H, W] or [H, W], got {list(img.shape)}"
        )
    return img


def save_image(img: torch.Tensor, path: str | os.PathLike) -> None:
    """Write an image tensor (``[1, 3, H, W]``, ``[3, H, W]``, ``[1, H, W]`` or ``[H, W]``, values in
    ``[0, 1]``, clipped) to ``path``; the format follows the extension (PNG recommended). Parent
    directories are created."""
    from PIL import Image

    chw = _as_chw(img, "save_image").detach().to("cpu", torch.float32)
    arr = (chw.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path)


def bicubic_resize(
    img: torch.Tensor,
    size: int | tuple[int, int] | None = None,
    *,
    scale: float | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Bicubic resize of ``img`` ``[B, C, H, W]`` to ``size`` (``(H', W')`` or an int for both) or by
    ``scale`` (output size ``round(H * scale), round(W * scale)``); exactly one of the two.

    Antialiased (``antialias=True``, i.e. the bicubic kernel is stretched, as PIL and MATLAB's
    ``imresize`` do) along any axis that shrinks; plain bicubic interpolation when enlarging. With
    ``clamp`` the bicubic overshoot is clipped to ``[0, 1]`` (images); turn it off for feature maps.
    """
    if not isinstance(img, torch.Tensor) or img.dim() != 4:
        got = list(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"bicubic_resize: expected a [B, C, H, W] tensor, got {got}")
    if not img.is_floating_point():
        raise TypeError(f"bicubic_resize: expected a floating-point tensor, got {img.dtype}")
    if (size is None) == (scale is None):
        raise ValueError("bicubic_resize: give exactly one of size and scale")
    h, w = img.shape[-2:]
    if size is None:
        if not scale > 0:
            raise ValueError(f"bicubic_resize: scale must be > 0, got {scale}")
        out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    elif isinstance(size, int):
        out_h = out_w = size
    else:
        out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"bicubic_resize: output size must be positive, got {(out_h, out_w)}")
    if (out_h, out_w) == (h, w):
        return img.clone()
    antialias = out_h < h or out_w < w
    work = img if img.dtype in (torch.float32, torch.float64) else img.float()
    out = F.interpolate(work, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=antialias)
    if clamp:
        out = out.clamp(0.0, 1.0)
    return out.to(img.dtype)


def quantize_8bit(img: torch.Tensor) -> torch.Tensor:
    """Clip to ``[0, 1]`` and round to the 256 levels of an 8-bit image (what saving to PNG does)."""
    return (img.clamp(0.0, 1.0) * 255.0).round() / 255.0


def resize(img: torch.Tensor, size: tuple[int, int], mode: str = "antialias") -> torch.Tensor:
    """Bicubic resize of images ``[B, C, H, W]`` in ``[0, 1]`` to ``size`` ``(H', W')``, in one of the
    conventions RefSR code uses:

    * ``"antialias"``: :func:`bicubic_resize` (antialiased when shrinking, clamped), our default;
    * ``"pil"``: PIL's ``Image.resize(..., BICUBIC)`` on 8-bit images, as the official AMSA data pipeline
      makes LR, LR-up and the multi-scale references: separable antialiased bicubic (a = -0.5), width
      first (as the Pillow of that release), each pass rounded and clipped to 8-bit levels (equal to
      PIL's passes within a level or two: its fixed-point coefficients round differently at times);
    * ``"torch"``: ``F.interpolate(mode="bicubic", align_corners=False)``: no antialiasing, no clamping
      (a = -0.75), as the official model resizes its matching pyramids inside its forward.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize: mode must be one of {RESIZE_MODES}, got {mode!r}")
    size = (int(size[0]), int(size[1]))
    if mode == "antialias":
        return bicubic_resize(img, size)
    if not isinstance(img, torch.Tensor) or img.dim() != 4 or not img.is_floating_point():
        got = list(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"resize: expected a floating-point [B, C, H, W] tensor, got {got}")
    work = img if img.dtype in (torch.float32, torch.float64) else img.float()
    if mode == "torch":
        return F.interpolate(work, size=size, mode="bicubic", align_corners=False).to(img.dtype)
    out = quantize_8bit(work)
    for axis_size in ((out.shape[-2], size[1]), size):  # width first, then height, as PIL does
        if tuple(out.shape[-2:]) != axis_size:
            out = F.interpolate(out, size=axis_size, mode="bicubic", align_corners=False, antialias=True)
            out = quantize_8bit(out)
    return out.to(img.dtype)


def read_json(path: str, what: str) -> object:
    """The JSON document at ``path``; a missing file or invalid JSON raises an error naming ``what``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} {path!r} is not valid JSON: {exc}") from exc


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path`` then rename it to ``path``; on failure
    the temporary file is removed and ``path`` is untouched. The temporary name keeps the extension (image
    writers pick the format from it). The file gets the permissions ``open`` would give a new file
    (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process's umask (read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: object) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_write(path, write)


def append_jsonl(path: str | os.PathLike, obj: object) -> None:
    """Append ``obj`` as one JSON line to ``path`` (a log: lines are only ever added)."""
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
