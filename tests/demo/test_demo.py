"""The demo's parts: image helpers and the RefSR pair (amsa.images), the fixed feature extractor
(amsa.features) and the end-to-end ``python -m amsa demo --quick`` (amsa.demo, amsa.__main__)."""

import csv
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from amsa.demo.pair import demo_pair
from amsa.io import bicubic_resize, load_image, save_image
from amsa.models.matching_features import FilterBankExtractor

# ----------------------------------------------------------------------------------------------------------
# images


@pytest.fixture(scope="module")
def pair():
    return demo_pair(64)


def test_demo_pair_shapes(pair):
    assert pair.hr.shape == (1, 3, 64, 64)
    assert pair.lr.shape == (1, 3, 16, 16)
    assert pair.lr_up.shape == (1, 3, 64, 64)
    assert pair.ref.shape == (1, 3, 64, 64)
    assert pair.ref_blur.shape == (1, 3, 64, 64)
    for t in (pair.hr, pair.lr, pair.lr_up, pair.ref, pair.ref_blur):
        assert t.dtype == torch.float32
        assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    assert pair.true_positions().shape == (64, 64, 2)
    # the crops overlap, but only partly
    frac = pair.overlap_mask().float().mean().item()
    assert 0.3 < frac < 0.99


def test_demo_pair_deterministic(pair):
    again = demo_pair(64)
    for name in ("hr", "lr", "lr_up", "ref", "ref_blur"):
        assert torch.equal(getattr(pair, name), getattr(again, name)), name
    assert pair.geometry == again.geometry


def _sample(img, pos):
    """Bicubic sample of img [1, 3, H, W] at float (y, x) pixel positions [h, w, 2] -> [3, h, w]."""
    h, w = img.shape[-2:]
    grid = torch.stack([(pos[..., 1] + 0.5) / w * 2 - 1, (pos[..., 0] + 0.5) / h * 2 - 1], dim=-1)
    return F.grid_sample(img, grid[None], mode="bicubic", align_corners=False)[0]


@pytest.mark.parametrize("kw", [{}, {"ref_scale": 1.25, "shift": (-0.1, 0.2)}, {"ref_scale": 1.0}])
def test_demo_pair_geometry(kw):
    """The reference pixel at the mapped position of an HR pixel has (nearly) the HR pixel's colour."""
    p = demo_pair(96, **kw)
    mask = p.overlap_mask(margin=2)
    assert mask.float().mean() > 0.2
    err = (_sample(p.ref, p.true_positions()) - p.hr[0]).abs().mean(0)
    assert err[mask].mean() < 0.03
    # and a wrong geometry (off by 3 px) is clearly worse
    off = p.true_positions() + torch.tensor([3.0, 0.0])
    err_off = (_sample(p.ref, off) - p.hr[0]).abs().mean(0)
    assert err_off[mask].mean() > 2 * err[mask].mean()
    # the mapping is invertible
    tp = p.true_positions()
    ys, xs = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    assert torch.allclose(p.geometry.ref_to_hr(tp), torch.stack([ys, xs], -1), atol=1e-3)


def test_demo_pair_blur_domain(pair):
    """lr_up and ref_blur are both down-up 4x: their high frequencies are gone compared with hr / ref."""

    def hf(x):
        return (x[..., 1:, :] - x[..., :-1, :]).abs().mean().item()

    assert hf(pair.lr_up) < 0.7 * hf(pair.hr)
    assert hf(pair.ref_blur) < 0.7 * hf(pair.ref)
    assert torch.allclose(bicubic_resize(pair.hr, (16, 16)), pair.lr)


def test_demo_pair_bad_args():
    with pytest.raises(ValueError, match="multiple of 4"):
        demo_pair(66)
    with pytest.raises(ValueError, match="ref_scale"):
        demo_pair(64, ref_scale=10.0)


def test_bicubic_resize_antialias_and_errors():
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float()[None, None]
    small = bicubic_resize(checker, (8, 8))
    assert small.shape == (1, 1, 8, 8)
    assert torch.allclose(small, torch.full_like(small, 0.5), atol=0.05)  # antialiased: grey, not aliased
    up = bicubic_resize(small, scale=2.0)
    assert up.shape == (1, 1, 16, 16)
    assert bicubic_resize(checker.double(), 32).dtype == torch.float64
    with pytest.raises(ValueError, match="exactly one"):
        bicubic_resize(checker)
    with pytest.raises(ValueError, match="exactly one"):
        bicubic_resize(checker, 8, scale=0.5)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        bicubic_resize(checker[0], 8)
    with pytest.raises(TypeError, match="floating"):
        bicubic_resize(checker.long(), 8)


def test_load_save_roundtrip_and_modes(tmp_path):
    rgb = torch.rand(1, 3, 10, 12)
    save_image(rgb, tmp_path / "sub" / "a.png")
    back = load_image(tmp_path / "sub" / "a.png")
    assert back.shape == (1, 3, 10, 12) and back.dtype == torch.float32
    assert (back - rgb).abs().max() <= 0.5 / 255 + 1e-6

    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    g = load_image(tmp_path / "g.png")
    assert g.shape == (1, 3, 4, 5)
    assert torch.equal(g[0, 0], g[0, 1]) and torch.equal(g[0, 0], g[0, 2])
    assert torch.allclose(g[0, 0] * 255, torch.from_numpy(grey).float())

    rgba = np.zeros((3, 3, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent except one opaque pixel
    rgba[1, 1, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    t = load_image(tmp_path / "t.png")
    assert t.shape == (1, 3, 3, 3)
    assert torch.allclose(t[0, :, 1, 1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(t[0, :, 0, 0], torch.ones(3))  # transparent -> white background

    with pytest.raises(FileNotFoundError, match="no such file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(ValueError, match="not an image"):
        load_image(tmp_path / "not_an_image.png")
    Image.fromarray(np.zeros((4, 4), dtype=np.float32), "F").save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match="mode 'F'"):
        load_image(tmp_path / "f.tiff")
    with pytest.raises(ValueError):
        save_image(torch.rand(2, 3, 4, 4), tmp_path / "b.png")


# ----------------------------------------------------------------------------------------------------------
# features


def test_extractor_shape_and_determinism(pair):
    ext = FilterBankExtractor()
    assert ext.out_channels == 64
    x = torch.cat([pair.lr_up, pair.ref_blur])
    f = ext(x)
    assert f.shape == (2, 64, 64, 64) and f.dtype == torch.float32
    assert torch.isfinite(f).all()
    assert torch.equal(f, FilterBankExtractor()(x))
    # no statistics shared across the batch: an image's features do not depend on its batch mates
    assert torch.allclose(f[1:], ext(pair.ref_blur), atol=1e-5)
    # non-square and tiny inputs work
    assert ext(torch.rand(1, 3, 20, 33)).shape == (1, 64, 20, 33)
    assert ext(torch.rand(1, 3, 1, 1)).shape == (1, 64, 1, 1)


def test_extractor_channels_are_informative(pair):
    f = FilterBankExtractor()(pair.hr)
    std = f.std(dim=(2, 3))[0]
    assert (std > 0).sum() >= 56  # at most a few channels flat on this crop
    raw = FilterBankExtractor(normalize="none")(pair.hr)
    assert raw.shape == f.shape and not torch.allclose(raw, f)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_extractor_dtypes(pair, dtype):
    ext = FilterBankExtractor()
    ref = ext(pair.hr)
    out = ext(pair.hr.to(dtype))
    assert out.dtype == dtype
    tol = {torch.float64: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}[dtype]
    assert (out.float() - ref).abs().max() < tol * max(1.0, ref.abs().max().item())


def test_extractor_bad_inputs():
    ext = FilterBankExtractor()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ext(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ext(torch.rand(1, 1, 16, 16))
    with pytest.raises(TypeError, match="floating-point"):
        ext(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ext(np.zeros((1, 3, 16, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="sigmas"):
        FilterBankExtractor((1.0, 2.0))
    with pytest.raises(ValueError, match="normalize"):
        FilterBankExtractor(normalize="batch")


def test_extractor_matches_true_correspondences():
    """Exact (enumerated) matching on these features finds the true correspondence for most pixels of the
    overlap, which colour alone does not."""
    amsa = pytest.importorskip("amsa")
    p = demo_pair(64)
    ext = FilterBankExtractor()
    m = amsa.enumerated_match(ext(p.lr_up), ext(p.ref_blur))
    mask = p.overlap_mask()
    d = (m.pos[0].float() - p.true_positions()).norm(dim=-1)[mask]
    assert (d <= 2).float().mean() > 0.5


# ----------------------------------------------------------------------------------------------------------
# end to end


def test_cli_rejects_bad_arguments(capsys):
    from amsa.cli import main

    with pytest.raises(SystemExit):
        main([])
    with pytest.raises(SystemExit):
        main(["demo", "--backend", "cuda"])
    with pytest.raises(SystemExit, match="multiple of 4"):
        main(["demo", "--size", "30"])


def test_demo_quick_end_to_end(tmp_path, capsys):
    from amsa.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("method", "GFLOPs", "speed-up", "CFE-PatchMatch paper 1-1-2-6", "Enumerated matching"):
        assert word in text
    for name in ("correspondences.png", "convergence.png", "results.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert Image.open(out / "correspondences.png").size[0] > 400
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    names = [r["method"] for r in rows]
    assert names[0].startswith("CFE-PatchMatch paper") and names[-1] == "Enumerated matching"
    by = {r["method"]: r for r in rows}
    enum = by["Enumerated matching"]
    assert float(enum["agreement_pct"]) == 100.0
    paper = rows[0]
    # PatchMatch never beats the exact argmax and gets most pixels right on this easy pair
    assert float(paper["mean_score"]) <= float(enum["mean_score"]) + 1e-6
    assert float(paper["agreement_pct"]) > 50.0
    assert float(paper["gflops"]) < float(enum["gflops"])
    assert float(paper["within_2px_pct"]) > 50.0


def test_run_demo_with_another_extractor(tmp_path):
    """The extractor can be swapped: any module mapping [1, 3, H, W] images to [1, C, H, W] features."""
    from amsa.demo.convergence import convergence_curve
    from amsa.demo.run import run_demo

    class ColourPatches(torch.nn.Module):
        def forward(self, x):
            return x - x.mean(dim=(2, 3), keepdim=True)

    lines = []
    res = run_demo(tmp_path, 48, extractor=ColourPatches(), log=lines.append)
    assert "ColourPatches, C=3" in "\n".join(lines)
    assert [r.iters for r in res.rows] == [(1, 1, 2, 6), (1, 1, 1, 4), (10,), None]
    assert all(os.path.isfile(f) for f in res.files.values())
    paper = res.rows[0]
    assert paper.match.pos.shape == (1, 48, 48, 2)
    assert 0.0 <= paper.agreement <= 100.0 and paper.flop_cut > 1
    with pytest.raises(ValueError, match="history=True"):
        convergence_curve(res.rows[-1].match, paper.match.pos, paper.match.pos, res.rows[-1].match)
