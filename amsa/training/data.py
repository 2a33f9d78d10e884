"""Training and test data for 4x RefSR.

Datasets return dicts of ``[3, H, W]`` float32 RGB tensors in ``[0, 1]``: ``hr`` (ground truth), ``lr``
(``hr`` bicubic-downsampled by ``scale`` as the official pipeline does it, with PIL on 8-bit images:
``amsa.io.resize(mode="pil")``) and ``ref`` (one reference), plus ``name``. Every resize of these images
uses that convention, so the official checkpoints, and models trained here, see the data the official
release trains and tests on.

* :class:`CUFEDTrainSet`: the CUFED training layout ``ROOT/input/NAME.png`` + ``ROOT/ref/NAME.png``
  (11,871 160x160 pairs). As in the official release: the HR image is cropped to a multiple of
  ``8 * scale``, a ``gt_size`` crop is taken, the reference is bicubic-resized to ``gt_size x gt_size``.
* :class:`SelfReferenceSet`: any folder of images, for users without CUFED5. The reference is a
  *transformed overlapping crop* of the same photo: a window around the HR crop, shifted by up to
  ``max_shift * gt_size``, seen at a random relative scale and with a random gamma.
* :class:`CUFED5TestSet`: the CUFED5 test layout ``ROOT/NNN_0.png`` (HR) with ``NNN_1.png`` ..
  ``NNN_5.png``, five references of decreasing relevance (levels 1..5).

Training augmentation (paper section 4.2): random horizontal and vertical flips, then a random rotation
by 0, 90, 180 or 270 degrees, the same for HR and reference.

Randomness is explicit: training indices are ``(index, seed)`` pairs drawn by :class:`TrainBatchSampler`
from the global sample counter, so a run resumed at any step sees exactly the batches of an uninterrupted
one, on any number of processes and data-loader workers. A plain integer index means ``seed = index``
(deterministic validation).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from amsa.io import load_image, quantize_8bit, resize, sample_photo_path

__all__ = [
    "SAMPLE_FOLDER",
    "CUFED5TestSet",
    "CUFEDTrainSet",
    "SelfReferenceSet",
    "TrainBatchSampler",
    "augment",
    "make_lr",
    "mod_crop",
]

# SelfReferenceSet(folder=SAMPLE_FOLDER) uses the photos matplotlib ships (grace_hopper.jpg and two small
# PNGs): a folder every installation has, for smoke runs and CI.
SAMPLE_FOLDER = "@sample"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
Sample = dict[str, object]


def mod_crop(img: torch.Tensor, multiple: int) -> torch.Tensor:
    """Crop ``[..., H, W]`` to the top-left ``H - H % multiple`` x ``W - W % multiple`` pixels."""
    h, w = img.shape[-2:]
    return img[..., : h - h % multiple, : w - w % multiple]


def make_lr(hr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """The LR input of ``hr`` ``[3, H, W]`` (H, W multiples of ``scale``): bicubic downsampling by ``scale``
    as PIL does it on 8-bit images (``amsa.io.resize(mode="pil")``), the official data pipeline's LR.
    Returns ``[3, H / scale, W / scale]`` in 8-bit levels."""
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"make_lr: hr size {h}x{w} is not a multiple of scale {scale}")
    return resize(hr.unsqueeze(0), (h // scale, w // scale), "pil")[0]


def augment(images: Sequence[torch.Tensor], hflip: bool, vflip: bool, rot90: int) -> list[torch.Tensor]:
    """Apply the same flips (horizontal, vertical) then ``rot90`` quarter turns to every ``[C, H, W]``."""
    out = []
    for img in images:
        if hflip:
            img = img.flip(-1)
        if vflip:
            img = img.flip(-2)
        if rot90 % 4:
            img = torch.rot90(img, rot90 % 4, dims=(-2, -1))
        out.append(img.contiguous())
    return out


def _random_augment(
    images: Sequence[torch.Tensor], g: torch.Generator, flip: bool, rot90: bool
) -> list[torch.Tensor]:
    # always draw the same numbers, so switching an option off does not shift the other draws
    draws = torch.randint(0, 2, (2,), generator=g).tolist()
    quarter = int(torch.randint(0, 4, (1,), generator=g))
    return augment(images, flip and draws[0] == 1, flip and draws[1] == 1, quarter if rot90 else 0)


def _split_index(item: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(item, tuple):
        return int(item[0]), int(item[1])
    return int(item), int(item)


def _list_images(folder: str, what: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what}: no such folder: {folder!r}")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"{what}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder!r}")
    return names


def _random_crop(
    img: torch.Tensor, size: int, g: torch.Generator, path: str
) -> tuple[torch.Tensor, int, int]:
    """A random ``size x size`` crop of ``[C, H, W]`` and its top-left ``(y, x)``."""
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"{path!r} is {h}x{w}, smaller than the crop size {size}")
    y = int(torch.randint(0, h - size + 1, (1,), generator=g))
    x = int(torch.randint(0, w - size + 1, (1,), generator=g))
    return img[..., y : y + size, x : x + size], y, x


def _check_sizes(gt_size: int, scale: int, what: str) -> None:
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"{what}: scale must be a positive int, got {scale!r}")
    if not isinstance(gt_size, int) or gt_size < 4 * scale or gt_size % scale:
        raise ValueError(
            f"{what}: gt_size must be a multiple of scale {scale} and >= {4 * scale}, got {gt_size!r}"
        )


class CUFEDTrainSet(Dataset):
    """CUFED training pairs: ``root/input/NAME`` (HR) and ``root/ref/NAME`` (its reference).

    Args:
        root: folder holding ``input/`` and ``ref/`` with the same file names.
        gt_size: HR crop size (official 160), a multiple of ``scale``.
        scale: super-resolution factor (4).
        flip, rot90: training augmentation.
    """

    def __init__(
        self, root: str, *, gt_size: int = 160, scale: int = 4, flip: bool = True, rot90: bool = True
    ):
        _check_sizes(gt_size, scale, "CUFEDTrainSet")
        self.input_dir, self.ref_dir = os.path.join(root, "input"), os.path.join(root, "ref")
        inputs = _list_images(self.input_dir, "CUFEDTrainSet")
        refs = set(_list_images(self.ref_dir, "CUFEDTrainSet"))
        missing = [n for n in inputs if n not in refs]
        if missing:
            raise ValueError(
                f"CUFEDTrainSet: {len(missing)} input images have no reference of the same name in "
                f"{self.ref_dir!r}, e.g. {missing[0]!r}"
            )
        self.names = inputs
        self.gt_size, self.scale, self.flip, self.rot90 = gt_size, scale, flip, rot90

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, item: int | tuple[int, int]) -> Sample:
        index, seed = _split_index(item)
        g = torch.Generator().manual_seed(seed)
        name = self.names[index]
        path = os.path.join(self.input_dir, name)
        hr, _, _ = _random_crop(mod_crop(load_image(path)[0], 8 * self.scale), self.gt_size, g, path)
        ref = resize(load_image(os.path.join(self.ref_dir, name)), (self.gt_size, self.gt_size), "pil")[0]
        hr, ref = _random_augment([hr, ref], g, self.flip, self.rot90)
        return {"hr": hr, "lr": make_lr(hr, self.scale), "ref": ref, "name": os.path.splitext(name)[0]}


class SelfReferenceSet(Dataset):
    """RefSR pairs cut from any folder of photos: the reference is a transformed overlapping crop.

    For each sample: an HR crop of ``gt_size`` pixels; a reference scale ``s`` drawn uniformly from
    ``ref_scale`` (reference pixels per HR pixel); a square window of ``gt_size / s`` photo pixels whose
    centre is the HR crop's centre moved by up to ``max_shift * gt_size`` pixels per axis (clamped to the
    photo), bicubic-resized to ``gt_size x gt_size``; then a gamma ``ref ** gamma`` with
    ``log(gamma)`` uniform in ``[-log(1 + gamma_jitter), log(1 + gamma_jitter)]``. HR and reference get
    the same flips and rotation when ``augment_data`` is on.

    Photos must be at least ``gt_size`` pixels on each side; where the window would exceed the photo the
    scale is raised until it fits. ``folder=SAMPLE_FOLDER`` (``"@sample"``) uses matplotlib's sample photos.
    """

    def __init__(
        self,
        folder: str,
        *,
        gt_size: int = 160,
        scale: int = 4,
        ref_scale: tuple[float, float] = (0.8, 1.25),
        max_shift: float = 0.25,
        gamma_jitter: float = 0.1,
        augment_data: bool = True,
    ):
        _check_sizes(gt_size, scale, "SelfReferenceSet")
        lo, hi = ref_scale
        if not 0.25 <= lo <= hi <= 4.0:
            raise ValueError(
                f"SelfReferenceSet: ref_scale must satisfy 0.25 <= lo <= hi <= 4, got {ref_scale}"
            )
        if not 0.0 <= max_shift <= 1.0:
            raise ValueError(f"SelfReferenceSet: max_shift must be in [0, 1], got {max_shift}")
        if gamma_jitter < 0:
            raise ValueError(f"SelfReferenceSet: gamma_jitter must be >= 0, got {gamma_jitter}")
        if folder == SAMPLE_FOLDER:
            folder = os.path.dirname(sample_photo_path())
        self.folder = folder
        self.names = _list_images(folder, "SelfReferenceSet")
        self.gt_size, self.scale = gt_size, scale
        self.ref_scale, self.max_shift, self.gamma_jitter = (float(lo), float(hi)), max_shift, gamma_jitter
        self.augment_data = augment_data

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, item: int | tuple[int, int]) -> Sample:
        index, seed = _split_index(item)
        g = torch.Generator().manual_seed(seed)
        path = os.path.join(self.folder, self.names[index])
        photo = load_image(path)[0]
        ph, pw = photo.shape[-2:]
        n = self.gt_size
        hr, top, left = _random_crop(photo, n, g, path)
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        s = self.ref_scale[0] + (self.ref_scale[1] - self.ref_scale[0]) * u[0]
        win = min(round(n / s), ph, pw)  # the window must fit in the photo
        cy = top + n / 2 + (2 * u[1] - 1) * self.max_shift * n
        cx = left + n / 2 + (2 * u[2] - 1) * self.max_shift * n
        y0 = int(min(max(round(cy - win / 2), 0), ph - win))
        x0 = int(min(max(round(cx - win / 2), 0), pw - win))
        ref = resize(photo[None, :, y0 : y0 + win, x0 : x0 + win], (n, n), "pil")[0]
        log_jitter = torch.log1p(torch.tensor(self.gamma_jitter, dtype=torch.float64))
        gamma = float(torch.exp((2 * u[3] - 1) * log_jitter))
        ref = quantize_8bit(ref.clamp_min(0.0) ** gamma)
        if self.augment_data:
            hr, ref = _random_augment([hr, ref], g, True, True)
        name = f"{os.path.splitext(self.names[index])[0]}_{seed}"
        return {"hr": hr.contiguous(), "lr": make_lr(hr, self.scale), "ref": ref, "name": name}


@dataclass(frozen=True)
class _TestItem:
    name: str
    hr: str
    refs: dict[int, str]


class CUFED5TestSet(Dataset):
    """The CUFED5 test set: ``root/NNN_0.png`` HR images with references ``NNN_k.png``, ``k = 1..5`` from
    the most to the least relevant.

    Items: ``{"name", "hr", "lr", "refs"}`` with ``refs`` a dict ``level -> [3, Hr, Wr]``. HR and
    references are cropped to multiples of ``8 * scale`` (the official protocol); sizes differ between
    items, so iterate with batch size 1 (or directly).

    Args:
        root: the CUFED5 folder.
        levels: reference levels to load (default all five).
        scale: super-resolution factor.
    """

    def __init__(self, root: str, *, levels: Sequence[int] = (1, 2, 3, 4, 5), scale: int = 4):
        files = set(_list_images(root, "CUFED5TestSet"))
        levels = tuple(int(k) for k in levels)
        if not levels or any(k < 1 or k > 5 for k in levels):
            raise ValueError(f"CUFED5TestSet: levels must be a non-empty subset of 1..5, got {levels}")
        pattern = re.compile(r"^(\d+)_0\.png$")
        items = []
        for f in sorted(files):
            m = pattern.match(f)
            if not m:
                continue
            stem = m.group(1)
            refs = {k: os.path.join(root, f"{stem}_{k}.png") for k in levels}
            missing = [os.path.basename(p) for p in refs.values() if os.path.basename(p) not in files]
            if missing:
                raise ValueError(f"CUFED5TestSet: {f!r} lacks its references {missing} in {root!r}")
            items.append(_TestItem(stem, os.path.join(root, f), refs))
        if not items:
            raise ValueError(f"CUFED5TestSet: no HR images named NNN_0.png in {root!r}")
        self.items, self.levels, self.scale = items, levels, scale

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        multiple = 8 * self.scale
        hr = mod_crop(load_image(item.hr)[0], multiple)
        refs = {k: mod_crop(load_image(p)[0], multiple) for k, p in item.refs.items()}
        return {"name": item.name, "hr": hr, "lr": make_lr(hr, self.scale), "refs": refs}


class TrainBatchSampler:
    """Endless, resumable batch sampler for data-parallel training (use as ``DataLoader(batch_sampler=)``).

    The ``g``-th sample of the run (counted over all processes: micro-batch ``k`` of process ``rank`` holds
    ``g = (k * world_size + rank) * batch_size + j``) is item ``perm_e[g % n]`` of epoch ``e = g // n``, with
    ``perm_e = randperm(n)`` seeded by ``seed + e``, and carries the augmentation seed
    ``seed * 2^32 + g``. Starting at micro-batch ``start`` resumes a run exactly.
    """

    def __init__(
        self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0
    ):
        if n < 1 or batch_size < 1:
            raise ValueError(f"TrainBatchSampler: need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"TrainBatchSampler: rank {rank} not in [0, {world_size})")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start = seed, start
        self._perm: tuple[int, torch.Tensor] | None = None

    def _item(self, g: int) -> tuple[int, int]:
        epoch = g // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (
                epoch,
                torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)),
            )
        return int(self._perm[1][g % self.n]), self.seed * 2**32 + g

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start
        while True:
            first = (k * self.world_size + self.rank) * self.batch_size
            yield [self._item(first + j) for j in range(self.batch_size)]
            k += 1
