"""Training pairs of the matching extractor (C2-Matching's contrastive stages, paper section 3): an image
and a warp of it by a random homography, with the exact correspondence of every pixel.

Coordinates are pixel-index units ``(x, y)`` with pixel ``i`` centred at ``i`` (the centre convention of
:mod:`amsa.io`, shifted by 0.5). A homography ``H`` (3x3, float64) maps a pixel ``p`` of the input image
to ``H p`` in the reference; the reference is *made* by sampling the source photo at ``H^-1 q`` for
every reference pixel ``q`` (bicubic), so the correspondence is exact by construction: reference pixel
``q`` shows what the input shows at ``H^-1 q``.

* :func:`random_homography`: the official generator (each corner of the window moved by up to
  ``corner_jitter`` of its side) composed with a random scale, rotation and shift about the centre.
* :class:`HomographyPairSet`: samples ``{"img_in", "img_in_up", "img_ref", "homography", "name"}``:
  ``img_in`` the sharp input (teacher side), ``img_in_up`` its 4x bicubic LR upsampled back (the student's
  LR-up), ``img_ref`` the warped reference (sharp, as AMSA's references are). Either CUFED's training
  layout (``ROOT/input/*.png`` resized to ``gt_size``, as the official release does; ``ROOT/ref`` is not
  used by these stages) or any folder of photos (random ``gt_size`` crops; the reference is sampled from
  the whole photo, so it shows real content beyond the crop's border).
* :func:`feature_correspondences`: for feature maps of stride 4 (VGG16 to conv3_1), the input cells whose
  centre lands inside the reference and the reference cell nearest to it: what the contrastive loss needs.

Randomness comes from the ``(index, seed)`` items of :class:`amsa.training.data.TrainBatchSampler`, so a
resumed run sees the same pairs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from amsa.grid import cell_centres
from amsa.io import bicubic_resize, load_image
from amsa.training.data import _list_images, _random_augment, _split_index, make_lr

__all__ = [
    "STRIDE",
    "HomographyPairSet",
    "apply_homography",
    "feature_correspondences",
    "homography_from_corners",
    "photo_paths",
    "random_homography",
    "warp_image",
]

STRIDE = 4  # input pixels per feature cell of the extractor (two 2x2 max-pools)
SKIMAGE_FOLDER = "@skimage"  # the photos scikit-image ships, if it is installed (no import needed)


def photo_paths(folder: str, files: Sequence[str] | None = None, *, what: str = "photos") -> list[str]:
    """Image paths of ``folder`` (``"@sample"``: matplotlib's sample photos, ``"@skimage"``: scikit-image's
    data folder), all of them or only ``files`` (names inside the folder), sorted."""
    from amsa.training.data import SAMPLE_FOLDER

    if folder == SAMPLE_FOLDER:
        from amsa.io import sample_photo_path

        folder = os.path.dirname(sample_photo_path())
    elif folder == SKIMAGE_FOLDER:
        import importlib.util

        spec = importlib.util.find_spec("skimage")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"{what}: '@skimage' needs scikit-image installed (pip install scikit-image)")
        folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    if files is None:
        return [os.path.join(folder, n) for n in _list_images(folder, what)]
    paths = [os.path.join(folder, n) for n in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{what}: no such image file {missing[0]!r}")
    return sorted(paths)


def homography_from_corners(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The 3x3 homography (float64, ``H[2, 2] = 1``) mapping the 4 points ``src`` [4, 2] (x, y) onto
    ``dst`` [4, 2]: the direct linear solve of ``dst ~ H src`` (8 equations, 8 unknowns)."""
    src, dst = src.to(torch.float64), dst.to(torch.float64)
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src.tolist(), dst.tolist()):
        rows.append([x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y])
        rows.append([0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y])
        rhs += [u, v]
    h = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return torch.cat([h, h.new_ones(1)]).view(3, 3)


def apply_homography(h: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``points`` [..., 2] (x, y) mapped by ``h`` [3, 3] (projective division), float64."""
    p = points.to(torch.float64)
    q = p @ h[:, :2].T.to(torch.float64) + h[:, 2].to(torch.float64)
    return q[..., :2] / q[..., 2:]


def random_homography(
    size: int,
    g: torch.Generator,
    *,
    corner_jitter: float = 10 / 160,
    scale: tuple[float, float] = (1.0, 1.0),
    max_rotation: float = 0.0,
    max_shift: float = 0.0,
) -> torch.Tensor:
    """A random homography of a ``size x size`` window onto a reference of the same size: about the
    window's centre, a scale ``s`` (reference pixels per input pixel, ``log s`` uniform in ``log scale``),
    a rotation uniform in ``+-max_rotation`` degrees and a shift uniform in ``+-max_shift * size`` per
    axis, then every corner moved by up to ``corner_jitter * size`` per axis (the official generator:
    ``randint(0, 10)`` pixels of a 160 window with a random sign). Always draws 12 numbers."""
    u = torch.rand(12, generator=g, dtype=torch.float64)
    lo, hi = math.log(scale[0]), math.log(scale[1])
    s = math.exp(lo + (hi - lo) * float(u[0]))
    theta = math.radians(max_rotation * (2 * float(u[1]) - 1))
    shift = torch.tensor([2 * float(u[2]) - 1, 2 * float(u[3]) - 1], dtype=torch.float64) * max_shift * size
    c = (size - 1) / 2
    corners = torch.tensor([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], dtype=torch.float64)
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
                       dtype=torch.float64)
    moved = (corners - c) @ (s * rot).T + c + shift
    moved = moved + (2 * u[4:12].view(4, 2) - 1) * corner_jitter * size
    return homography_from_corners(corners, moved)


def warp_image(photo: torch.Tensor, h: torch.Tensor, origin: tuple[int, int], size: int, *,
               mode: str = "bicubic") -> torch.Tensor:
    """The reference: ``ref(q) = photo(origin + H^-1 q)`` for the ``size x size`` reference pixels ``q``,
    interpolated (``mode`` of ``grid_sample``; bicubic clamped to [0, 1]), zero outside the photo.
    ``photo`` [3, Hp, Wp]; ``origin`` (y, x) of the input window in the photo (the frame ``h`` is defined
    in). Returns [3, size, size]."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    src = apply_homography(torch.linalg.inv(h), torch.stack([xs, ys], -1))
    hp, wp = photo.shape[-2:]
    # pixel-index coordinate p -> grid_sample's normalised (2p + 1) / n - 1 (align_corners=False)
    gx = (2 * (src[..., 0] + origin[1]) + 1) / wp - 1
    gy = (2 * (src[..., 1] + origin[0]) + 1) / hp - 1
    grid = torch.stack([gx, gy], -1).to(photo.dtype)[None]
    out = F.grid_sample(photo[None], grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out[0].clamp(0.0, 1.0)


def feature_correspondences(
    h: torch.Tensor, in_cells: tuple[int, int], ref_cells: tuple[int, int], *, border: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth of the contrastive loss on feature maps of stride :data:`STRIDE`.

    Input cell ``(i, j)`` covers input pixels ``[4i, 4i + 4) x [4j, 4j + 4)``, centre ``(4j + 1.5,
    4i + 1.5)`` (x, y); ``H`` maps it to ``p`` in reference pixels and the nearest reference cell is
    ``round((p - 1.5) / 4)``. A cell counts where ``p`` lies at least ``border`` pixels inside the
    reference (the official release: 10). Returns ``(idx1, pos2)``: flat indices [n] into the input
    feature map (row-major ``i * w1 + j``) and (row, col) [n, 2] int64 of the reference cells."""
    h1, w1 = in_cells
    h2, w2 = ref_cells
    centres = cell_centres((h1, w1), STRIDE).flip(-1).reshape(-1, 2)  # (x, y)
    p = apply_homography(h, centres)
    inside = ((p[:, 0] >= border) & (p[:, 0] <= STRIDE * w2 - 1 - border)
              & (p[:, 1] >= border) & (p[:, 1] <= STRIDE * h2 - 1 - border))
    idx1 = inside.nonzero().squeeze(1)
    cells = torch.round((p[idx1] - 1.5) / STRIDE).long()
    pos2 = torch.stack([cells[:, 1].clamp(0, h2 - 1), cells[:, 0].clamp(0, w2 - 1)], -1)
    return idx1, pos2


class HomographyPairSet(Dataset):
    """Contrastive training (and validation) pairs: an image, its 4x LR-up and a homography warp.

    Args:
        paths: image files.
        gt_size: side of the input window and of the reference, a multiple of 4 (official 160).
        crop: ``"random"`` (a random ``gt_size`` window of each photo; photos must be that large) or
            ``"resize"`` (the whole image bicubic-resized to ``gt_size``: the official CUFED recipe).
        corner_jitter, scale, max_rotation, max_shift: the geometry (:func:`random_homography`); the
            official stages use ``corner_jitter = 10 / 160`` alone.
        flip, rot90: augmentation of the photo before the pair is cut (official: both on).

    Item ``(index, seed)`` (a plain ``index`` means ``seed = index``): ``img_in``, ``img_in_up`` and
    ``img_ref`` [3, gt_size, gt_size] float32 in [0, 1], ``homography`` [3, 3] float64 (input pixels to
    reference pixels), ``name``.
    """

    def __init__(
        self,
        paths: Sequence[str],
        *,
        gt_size: int = 160,
        crop: str = "random",
        corner_jitter: float = 10 / 160,
        scale: tuple[float, float] = (1.0, 1.0),
        max_rotation: float = 0.0,
        max_shift: float = 0.0,
        flip: bool = True,
        rot90: bool = True,
    ):
        if not paths:
            raise ValueError("HomographyPairSet: no images")
        if not isinstance(gt_size, int) or gt_size < 6 * STRIDE or gt_size % STRIDE:
            raise ValueError(f"HomographyPairSet: gt_size must be a multiple of {STRIDE} and >= "
                             f"{6 * STRIDE}, got {gt_size!r}")
        if crop not in ("random", "resize"):
            raise ValueError(f"HomographyPairSet: crop must be 'random' or 'resize', got {crop!r}")
        lo, hi = (float(v) for v in scale)
        if not 0.25 <= lo <= hi <= 4.0:
            raise ValueError(f"HomographyPairSet: scale must satisfy 0.25 <= lo <= hi <= 4, got {scale}")
        for name, v, top in (("corner_jitter", corner_jitter, 0.25), ("max_shift", max_shift, 0.5),
                             ("max_rotation", max_rotation, 180.0)):
            if not 0.0 <= v <= top:
                raise ValueError(f"HomographyPairSet: {name} must be in [0, {top}], got {v}")
        self.paths, self.gt_size, self.crop = list(paths), gt_size, crop
        self.geometry = {"corner_jitter": float(corner_jitter), "scale": (lo, hi),
                         "max_rotation": float(max_rotation), "max_shift": float(max_shift)}
        self.flip, self.rot90 = flip, rot90

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, seed = _split_index(item)
        g = torch.Generator().manual_seed(seed)
        path, n = self.paths[index], self.gt_size
        photo = load_image(path)
        if self.crop == "resize":
            photo = bicubic_resize(photo, n)
        photo = _random_augment([photo[0]], g, self.flip, self.rot90)[0]
        ph, pw = photo.shape[-2:]
        if ph < n or pw < n:
            raise ValueError(f"HomographyPairSet: {path!r} is {ph}x{pw}, smaller than gt_size {n}")
        y0 = int(torch.randint(0, ph - n + 1, (1,), generator=g))
        x0 = int(torch.randint(0, pw - n + 1, (1,), generator=g))
        h = random_homography(n, g, **self.geometry)
        img_in = photo[:, y0 : y0 + n, x0 : x0 + n].contiguous()
        lr = make_lr(img_in, STRIDE)
        img_in_up = bicubic_resize(lr[None], n)[0]
        return {"img_in": img_in, "img_in_up": img_in_up, "img_ref": warp_image(photo, h, (y0, x0), n),
                "homography": h, "name": f"{os.path.splitext(os.path.basename(path))[0]}_{seed}"}
