"""What the official checkpoints see: the matching stage normalises the finest-level features per pixel
(its scores are then 1/3 of the official ``max_val``), and images are resized with the official
conventions (PIL's bicubic on 8-bit images for data, non-antialiased ``F.interpolate`` for pyramids)."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from amsa import AMSA, cfe_patchmatch
from amsa.io import load_image, resize, sample_photo_path
from amsa.models.matching_features import FilterBankExtractor
from tests.support.references import similarity64
from tests.support.tolerances import assert_cosines_close, assert_matches_agree, cosine_atol

TINY = dict(ngf=8, n_blocks=1, ref_scales=2, iters=(1, 1), backend="torch")


def tiny(**kw) -> AMSA:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights are intended here
        return AMSA(**{**TINY, **kw})


def _u8(img: torch.Tensor) -> np.ndarray:
    return (img[0] * 255).round().byte().permute(1, 2, 0).numpy()


def _pil_resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's bicubic resize, horizontal pass first, as the Pillow of the official release runs it (as two
    single-axis PIL resizes: Pillow 13 may order the passes the other way round)."""
    im = Image.fromarray(_u8(img))
    out = im.resize((size[1], im.size[1]), Image.BICUBIC).resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(out).astype(np.float32) / 255).permute(2, 0, 1)[None]


def _levels_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b).abs() * 255).round()


@pytest.mark.parametrize("size", [(29, 33), (80, 90), (37, 20), (12, 61)])
def test_pil_resize_equals_pil(size):
    img = torch.randint(0, 256, (1, 3, 37, 41)).float() / 255
    got = resize(img, size, "pil")
    want = _pil_resize(img, size)
    diff = _levels_apart(got, want)
    assert torch.equal(got * 255, (got * 255).round())  # 8-bit levels, as PIL's
    # PIL's fixed-point coefficients and round-half-up differ from float arithmetic by a level at times
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_torch_resize_is_plain_bicubic_interpolation():
    step = torch.zeros(1, 3, 16, 16)
    step[..., 8:] = 1.0
    got = resize(step, (40, 40), "torch")
    torch.testing.assert_close(got, F.interpolate(step, size=(40, 40), mode="bicubic", align_corners=False))
    assert got.min() < 0 and got.max() > 1  # not clamped (the official pyramids overshoot too)
    with pytest.raises(ValueError, match="mode must be one of"):
        resize(step, (8, 8), "area")


def test_official_multiscale_references_are_successive_pil_resizes():
    """Ref_i of the official data pipeline: each scale PIL-resized from the previous one to
    int(previous * 0.8) (floats carried), cut to a multiple of 4, zero-padded to the common size."""
    model = tiny(ref_scales=4)
    ref = torch.randint(0, 256, (1, 3, 60, 75)).float() / 255
    got = model._multiscale([ref], (64, 80))
    h, w, img = 60.0, 75.0, ref
    for i, g in enumerate(got):
        if i:
            h, w = h * 0.8, w * 0.8
            img = _pil_resize(img, (int(h), int(w)))
        cut = img[..., : img.shape[-2] // 4 * 4, : img.shape[-1] // 4 * 4]
        assert g.shape == (1, 3, 64, 80)
        assert _levels_apart(g[..., : cut.shape[-2], : cut.shape[-1]], cut).max() <= 2
        assert not g[..., cut.shape[-2]:, :].any() and not g[..., cut.shape[-1]:].any()


class _Recorder(torch.nn.Module):
    """A stand-in extractor: its 'features' are its input images (3 channels), recorded."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return x * 1.0


def test_official_pyramids_and_per_pixel_normalisation():
    """Query: LR-up by PIL at the finest level, the coarse levels the LR chained down by F.interpolate
    bicubic and up 4x by it; references chained down by F.interpolate. Only the finest levels are
    per-pixel normalised."""
    model = tiny(iters=(1, 1, 1))
    model.matching_extractor.feature_extraction_image1 = _Recorder()
    model.matching_extractor.feature_extraction_image2 = _Recorder()
    lr = torch.randint(0, 256, (1, 3, 12, 16)).float() / 255
    ref = torch.rand(1, 3, 48, 64)
    query, (keys,) = model.matching_features(lr, [ref])
    interp = lambda x, s: F.interpolate(x, size=s, mode="bicubic", align_corners=False)
    lr2 = interp(lr, (6, 8))
    lr4 = interp(lr2, (3, 4))
    torch.testing.assert_close(query[2], F.normalize(resize(lr, (48, 64), "pil"), dim=1))
    assert _levels_apart(resize(lr, (48, 64), "pil"), _pil_resize(lr, (48, 64))).max() <= 2
    torch.testing.assert_close(query[1], interp(lr2, (24, 32)))
    torch.testing.assert_close(query[0], interp(lr4, (12, 16)))
    torch.testing.assert_close(keys[2], F.normalize(ref, dim=1))
    torch.testing.assert_close(keys[1], interp(ref, (24, 32)))
    torch.testing.assert_close(keys[0], interp(interp(ref, (24, 32)), (12, 16)))
    torch.testing.assert_close(query[2].norm(dim=1), torch.ones(1, 48, 64))
    raw = tiny(iters=(1, 1, 1), normalize_features=False, resize="antialias")
    raw.matching_extractor.feature_extraction_image1 = _Recorder()
    raw.matching_extractor.feature_extraction_image2 = _Recorder()
    query_raw, _ = raw.matching_features(lr, [ref])
    assert not torch.allclose(query_raw[2].norm(dim=1), torch.ones(1, 48, 64))


def _official_max_val(query: torch.Tensor, ref: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The official finest-level score at given positions, written out from its definition in float64:
    valid 3x3 patches only (the map shrinks by 2), the query patch of per-pixel-normalised features as
    is, the reference patch normalised over 9C; a 1-pixel border of zeros. query, ref [1, C, H, W]
    (already per-pixel normalised), pos [1, H, W, 2] (y, x) -> [1, H, W]."""
    q, r = query.double(), ref.double()
    _, C, H, W = q.shape
    qp = F.unfold(q, 3).view(9 * C, H - 2, W - 2)
    rp = F.normalize(F.unfold(r, 3), dim=1).view(9 * C, r.shape[2] - 2, r.shape[3] - 2)
    out = torch.zeros(1, H, W, dtype=torch.float64)
    for y in range(1, H - 1):
        for x in range(1, W - 1):
            py, px = pos[0, y, x].tolist()
            if 1 <= py < r.shape[2] - 1 and 1 <= px < r.shape[3] - 1:
                out[0, y, x] = (qp[:, y - 1, x - 1] * rp[:, py - 1, px - 1]).sum()
    return out


def test_match_scores_are_cosines_of_normalised_patches_and_a_third_of_the_official_max_val():
    model = tiny()
    # Structured features at the extractor's 1/4 scale (a random VGG's features of a small image are nearly
    # constant, so its matches pile up on the border).
    for branch in ("feature_extraction_image1", "feature_extraction_image2"):
        setattr(model.matching_extractor, branch, torch.nn.Sequential(FilterBankExtractor(),
                                                                      torch.nn.AvgPool2d(4)))
    photo = load_image(sample_photo_path())
    ref = photo[..., 200:264, 220:300]
    lr = resize(photo[..., 190:254, 210:290], (16, 20), "pil")
    query, keys = model.matching_features(lr, model._multiscale([ref], (64, 80)))
    matches = model.match(lr, ref)
    direct = cfe_patchmatch(query, keys, model.iters, seed=model.seed, backend="torch")
    for m, d, k in zip(matches, direct, keys):
        assert_matches_agree(m, d, query[-1], k[-1])
        assert_cosines_close(m.score, similarity64(query[-1], k[-1], m.pos), query[-1].shape[1])
        official = _official_max_val(query[-1], k[-1], m.pos)
        inner = torch.zeros_like(official, dtype=torch.bool)
        inner[:, 1:-1, 1:-1] = True
        inside = inner & (m.pos[..., 0] >= 1) & (m.pos[..., 0] < k[-1].shape[2] - 1)
        inside &= (m.pos[..., 1] >= 1) & (m.pos[..., 1] < k[-1].shape[3] - 1)
        assert inside.float().mean() > 0.3
        gap = (official - 3 * m.score.double()).abs()
        assert gap[inside].max() <= 3 * cosine_atol(torch.float32, query[-1].shape[1])
        assert (official[~inner] == 0).all()  # the official border scores 0


def test_model_options_are_checked():
    with pytest.raises(ValueError, match="resize must be one of"):
        tiny(resize="bilinear")
    assert "normalize_features=True" in repr(tiny()) and "resize='official'" in repr(tiny())
