"""amsa.metrics against known values and independent formulas (written differently on purpose)."""

import math

import numpy as np
import pytest
import torch

from amsa.evaluation.metrics import psnr, quantize_8bit, rgb_to_y, ssim


def _rand(shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_rgb_to_y_matlab_values():
    # MATLAB: rgb2ycbcr([0 0 0]) -> Y 16/255, [1 1 1] -> 235/255, pure R, G, B -> 16 + 65.481 etc.
    colours = torch.tensor(
        [[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.25, 0.75]], dtype=torch.float64
    )
    img = colours.t().reshape(1, 3, 1, 6)
    y = rgb_to_y(img).flatten().tolist()
    expected = [16.0, 235.0, 81.481, 144.553, 40.966, 16 + 0.5 * 65.481 + 0.25 * 128.553 + 0.75 * 24.966]
    assert y == pytest.approx(expected, abs=1e-9)
    # uint8 MATLAB rounds: white -> 235, red -> 81, green -> 145, blue -> 41
    assert [round(v) for v in y[:5]] == [16, 235, 81, 145, 41]


def test_identical_images():
    x = _rand((2, 3, 23, 31), 1)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_constant_offset_closed_form():
    # an RGB offset d on every channel moves Y by d * (65.481 + 128.553 + 24.966) = 219 d exactly
    x = _rand((1, 3, 20, 20), 2).double() * 0.5
    d = 3.0 / 255.0
    got = psnr(x + d, x, crop_border=0).item()
    assert got == pytest.approx(20 * math.log10(255.0 / (219.0 * d)), abs=1e-9)


def test_psnr_crop_border_ignores_border():
    x = _rand((1, 3, 16, 16), 3)
    y = x.clone()
    y[..., :4, :] = 0.0
    y[..., :, -4:] = 1.0
    assert torch.isinf(psnr(y, x, crop_border=4)).all()
    assert torch.isfinite(psnr(y, x, crop_border=3)).all()


def _ssim_numpy(a_rgb: np.ndarray, b_rgb: np.ndarray, border: int) -> float:
    """Independent SSIM: numpy, explicit loops over valid windows, statistics as weighted sums."""

    def y(img):  # img [3, H, W] in [0, 1]
        return 16.0 + 65.481 * img[0] + 128.553 * img[1] + 24.966 * img[2]

    a, b = y(a_rgb), y(b_rgb)
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    r = np.arange(11) - 5.0
    g1 = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g1, g1)
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va = (w * (pa - ma) ** 2).sum()
            vb = (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_against_independent_float64():
    hr = _rand((2, 3, 29, 26), 4)
    sr = (hr + 0.1 * _rand((2, 3, 29, 26), 5) - 0.05).clamp(0, 1)
    got = ssim(sr, hr, crop_border=4)
    for i in range(2):
        ref = _ssim_numpy(sr[i].double().numpy(), hr[i].double().numpy(), 4)
        assert got[i].item() == pytest.approx(ref, abs=1e-10)
    assert (got < 1).all()


def test_psnr_against_independent_float64_noncontiguous():
    hr = _rand((3, 3, 24, 30), 6).transpose(-1, -2)  # non-contiguous
    sr = _rand((3, 3, 30, 24), 7)
    got = psnr(sr, hr, crop_border=4)
    for i in range(3):
        a, b = sr[i].double().numpy(), hr[i].double().numpy()
        ya = 16 + a[0] * 65.481 + a[1] * 128.553 + a[2] * 24.966
        yb = 16 + b[0] * 65.481 + b[1] * 128.553 + b[2] * 24.966
        mse = np.mean((ya[4:-4, 4:-4] - yb[4:-4, 4:-4]) ** 2)
        assert got[i].item() == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-10)


def test_quantize_8bit():
    x = torch.tensor([-0.2, 0.0, 0.5, 1.0 / 255 * 0.49, 1.0 / 255 * 0.51, 1.3])
    assert (quantize_8bit(x) * 255).tolist() == [0.0, 0.0, 128.0, 0.0, 1.0, 255.0]


def test_bad_inputs():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, torch.rand(1, 3, 16, 17))
    with pytest.raises(ValueError, match=r"sr must be an RGB batch"):
        ssim(torch.rand(3, 16, 16), x)
    with pytest.raises(TypeError, match="floating-point"):
        psnr(x, (x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="11x11"):
        ssim(x, x, crop_border=4)
    with pytest.raises(ValueError, match="nothing after cropping"):
        psnr(x, x, crop_border=8)
