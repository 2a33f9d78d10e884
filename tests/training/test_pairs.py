"""Homography pairs of the matching extractor: the homography solve, the warp (exact on linear images
under bilinear sampling, where interpolation is exact), the correspondences at feature cells, seeding and
both data layouts."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amsa.training.extractor_config import build_pair_dataset
from amsa.training.pairs import (
    STRIDE,
    HomographyPairSet,
    apply_homography,
    feature_correspondences,
    homography_from_corners,
    random_homography,
    warp_image,
)


def _ramp(h, w, dtype=torch.float64):
    """A linear image [3, h, w] in (0, 1): bilinear interpolation reproduces it exactly."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return torch.stack([0.2 + 0.002 * xs + 0.001 * ys, 0.5 + 0.0015 * xs - 0.001 * ys, 0.1 + 0.001 * ys])


def _ramp_at(x, y):
    return torch.stack([0.2 + 0.002 * x + 0.001 * y, 0.5 + 0.0015 * x - 0.001 * y, 0.1 + 0.001 * y])


def test_homography_from_corners_maps_the_corners():
    src = torch.tensor([[0.0, 0.0], [95.0, 0.0], [95.0, 95.0], [0.0, 95.0]])
    dst = src + torch.tensor([[3.0, -2.0], [-4.0, 1.5], [2.0, 5.0], [-1.0, -3.0]])
    h = homography_from_corners(src, dst)
    assert h.dtype == torch.float64 and h[2, 2] == 1
    torch.testing.assert_close(apply_homography(h, src), dst.double(), atol=1e-10, rtol=0)


def test_random_homography_is_seeded_and_identity_without_geometry():
    g = lambda s: torch.Generator().manual_seed(s)
    kw = dict(corner_jitter=0.05, scale=(0.8, 1.25), max_rotation=10, max_shift=0.1)
    assert torch.equal(random_homography(96, g(1), **kw), random_homography(96, g(1), **kw))
    assert not torch.equal(random_homography(96, g(1), **kw), random_homography(96, g(2), **kw))
    identity = random_homography(96, g(1), corner_jitter=0.0)
    torch.testing.assert_close(identity, torch.eye(3, dtype=torch.float64))
    # a pure scale about the window's centre
    h = random_homography(96, g(3), corner_jitter=0.0, scale=(0.5, 0.5))
    c = torch.tensor([[47.5, 47.5], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(apply_homography(h, c), torch.tensor([[47.5, 47.5], [23.75, 23.75]],
                                                                   dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warp_is_exact_under_the_homography(seed):
    """ref(q) = photo(origin + H^-1 q): checked on a linear image, which bilinear sampling reproduces."""
    h = random_homography(64, torch.Generator().manual_seed(seed), scale=(0.8, 1.25), max_rotation=10,
                          max_shift=0.1)
    origin = (60, 70)
    ref = warp_image(_ramp(200, 220), h, origin, 64, mode="bilinear")
    ys, xs = torch.meshgrid(torch.arange(64.0, dtype=torch.float64), torch.arange(64.0, dtype=torch.float64),
                            indexing="ij")
    src = apply_homography(torch.linalg.inv(h), torch.stack([xs, ys], -1))
    torch.testing.assert_close(ref, _ramp_at(src[..., 0] + origin[1], src[..., 1] + origin[0]),
                               atol=1e-12, rtol=0)


def test_warp_integer_shift_copies_pixels_and_zero_outside():
    photo = torch.rand(3, 40, 50, dtype=torch.float64)
    h = torch.eye(3, dtype=torch.float64)
    h[0, 2], h[1, 2] = 5.0, -3.0  # input pixel (x, y) is reference pixel (x + 5, y - 3)
    ref = warp_image(photo, h, (10, 12), 16)  # bicubic at integer positions: the samples themselves
    torch.testing.assert_close(ref[:, :, 5:], photo[:, 13:29, 12:23], atol=1e-12, rtol=0)
    far = torch.eye(3, dtype=torch.float64)
    far[0, 2] = 200.0
    assert torch.equal(warp_image(photo, far, (0, 0), 16), torch.zeros(3, 16, 16, dtype=torch.float64))


def test_feature_correspondences_of_a_translation():
    h = torch.eye(3, dtype=torch.float64)
    h[0, 2], h[1, 2] = 8.0, 4.0  # 2 cells right, 1 cell down
    idx1, pos2 = feature_correspondences(h, (6, 7), (6, 7), border=0.0)
    rows, cols = idx1 // 7, idx1 % 7
    # centres 4i + 1.5 + shift must stay inside [0, 4 * 6 - 1] x [0, 4 * 7 - 1]: i <= 4, j <= 4
    assert set(zip(rows.tolist(), cols.tolist())) == {(i, j) for i in range(5) for j in range(5)}
    assert torch.equal(pos2, torch.stack([rows + 1, cols + 2], 1))
    # border 8 px of a 24 x 28 px reference: y' = 4i + 5.5 in [8, 15] -> i = 1, 2; x' = 4j + 9.5 in [8, 19]
    # -> j = 0, 1, 2
    idx1, pos2 = feature_correspondences(h, (6, 7), (6, 7), border=8.0)
    assert idx1.tolist() == [7, 8, 9, 14, 15, 16]
    assert pos2.tolist() == [[2, 2], [2, 3], [2, 4], [3, 2], [3, 3], [3, 4]]


def _smooth_photo(path, h=150, w=170):
    from PIL import Image

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([0.5 + 0.3 * np.sin(xs / 9 + ys / 13), 0.5 + 0.3 * np.cos(ys / 11),
                    0.5 + 0.2 * np.sin((xs - ys) / 15)], -1)
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)
    return str(path)


def test_pair_set_correspondences_hold_in_the_images(tmp_path):
    """img_ref at H p shows img_in at p (both interpolate the same smooth photo), for every cell centre
    whose correspondence lies inside; the LR-up is the 4x down-up of img_in; items are seeded."""
    data = HomographyPairSet([_smooth_photo(tmp_path / "a.png")], gt_size=64, scale=(0.8, 1.25),
                             max_rotation=10, max_shift=0.1)
    s = data[(0, 7)]
    assert s["img_in"].shape == s["img_ref"].shape == s["img_in_up"].shape == (3, 64, 64)
    assert torch.equal(s["img_ref"], data[(0, 7)]["img_ref"]) and not torch.equal(s["img_ref"],
                                                                                  data[(0, 8)]["img_ref"])
    idx1, pos2 = feature_correspondences(s["homography"], (16, 16), (16, 16), border=4.0)
    assert idx1.numel() > 100
    ys, xs = idx1 // 16, idx1 % 16
    centres = torch.stack([STRIDE * xs + 1.5, STRIDE * ys + 1.5], 1).double()
    p = apply_homography(s["homography"], centres)
    grid = torch.stack([(2 * p[:, 0] + 1) / 64 - 1, (2 * p[:, 1] + 1) / 64 - 1], -1).float()
    at_ref = F.grid_sample(s["img_ref"][None], grid.view(1, 1, -1, 2), align_corners=False)[0, :, 0]
    g_in = torch.stack([(2 * centres[:, 0] + 1) / 64 - 1, (2 * centres[:, 1] + 1) / 64 - 1], -1).float()
    at_in = F.grid_sample(s["img_in"][None], g_in.view(1, 1, -1, 2), align_corners=False)[0, :, 0]
    assert (at_ref - at_in).abs().max() < 0.02  # 8-bit photo, two interpolations
    # the nearest reference cell holds the centre's correspondence within half a cell
    assert ((p.flip(-1) - 1.5) / STRIDE - pos2).abs().max() <= 0.5 + 1e-9


def test_cufed_layout_resizes_whole_inputs(tmp_path):
    (tmp_path / "input").mkdir()
    for name in ("001.png", "002.png"):
        _smooth_photo(tmp_path / "input" / name, 100, 120)
    data = build_pair_dataset({"kind": "cufed", "root": str(tmp_path), "gt_size": 96})
    assert len(data) == 2 and data.crop == "resize"
    s = data[0]
    assert s["img_in"].shape == (3, 96, 96) and s["name"].startswith("001")


def test_pair_set_errors(tmp_path):
    path = _smooth_photo(tmp_path / "a.png", 40, 40)
    with pytest.raises(ValueError, match="gt_size"):
        HomographyPairSet([path], gt_size=30)
    with pytest.raises(ValueError, match="scale"):
        HomographyPairSet([path], scale=(0.1, 1.0))
    with pytest.raises(ValueError, match="smaller than gt_size"):
        HomographyPairSet([path], gt_size=64)[0]
    with pytest.raises(ValueError, match="unknown data keys"):
        build_pair_dataset({"kind": "photos", "folder": str(tmp_path), "gt_sise": 64})


def test_one_grid_truth_for_training_demo_and_plots():
    from amsa.demo.pair import grid_truth as demo_grid_truth
    from amsa.grid import cell_centres, grid_truth

    assert demo_grid_truth is grid_truth  # one implementation, below both training and demo
    c = cell_centres((2, 3), 4)
    assert c.dtype == torch.float64 and c.shape == (2, 3, 2)
    assert c[1, 2].tolist() == [5.5, 9.5] and cell_centres((1, 1), 1)[0, 0].tolist() == [0.0, 0.0]
    ref_yx = c.clone() + 4.0  # one cell down and right, on a 4 x 5 cell reference
    ref_yx[0, 0] = float("nan")
    truth, inside = grid_truth(ref_yx, (16, 20), 4)
    assert truth[1, 2].tolist() == [2.0, 3.0] and truth.dtype == torch.float32
    assert inside.tolist() == [[False, True, True], [True, True, True]]
