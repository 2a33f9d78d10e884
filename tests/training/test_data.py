"""amsa.data: dataset layouts, the self-reference construction, augmentation and the resumable sampler."""

import numpy as np
import pytest
import torch
from PIL import Image

from amsa.training.data import (
    SAMPLE_FOLDER,
    CUFED5TestSet,
    CUFEDTrainSet,
    SelfReferenceSet,
    TrainBatchSampler,
    augment,
    make_lr,
    mod_crop,
)


def _save(path, h, w, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def cufed(tmp_path_factory):
    root = tmp_path_factory.mktemp("cufed")
    (root / "input").mkdir()
    (root / "ref").mkdir()
    for i in range(3):
        _save(root / "input" / f"{i:05d}.png", 70, 75, i)  # mod-crop 32 -> 64x64
        _save(root / "ref" / f"{i:05d}.png", 50, 61, 10 + i)
    return root


@pytest.fixture(scope="module")
def cufed5(tmp_path_factory):
    root = tmp_path_factory.mktemp("cufed5")
    for i in range(2):
        _save(root / f"{i:03d}_0.png", 70, 99, i)
        for k in range(1, 6):
            _save(root / f"{i:03d}_{k}.png", 66 + k, 97, 10 * i + k)
    return root


def test_augment_is_the_dihedral_group():
    x = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)
    seen = set()
    for hf in (False, True):
        for vf in (False, True):
            for r in range(4):
                (y,) = augment([x], hf, vf, r)
                seen.add(tuple(y.flatten().tolist()) + tuple(y.shape))
    assert len(seen) == 8  # 16 combinations, 8 distinct transforms of a non-symmetric image
    a, b = augment([x, x + 1], True, False, 1)
    assert torch.equal(b, a + 1)  # the same transform for every image
    assert torch.equal(augment([x], False, False, 1)[0], torch.rot90(x, 1, (-2, -1)))


def test_make_lr_and_mod_crop():
    """LR as the official pipeline makes it: PIL's bicubic on the 8-bit HR (within one level)."""
    hr = torch.randint(0, 256, (3, 20, 28)).float() / 255
    lr = make_lr(hr)
    assert lr.shape == (3, 5, 7)
    assert torch.equal(lr * 255, (lr * 255).round())  # 8-bit levels
    u8 = (hr * 255).round().byte().permute(1, 2, 0).numpy()
    pil = torch.from_numpy(np.array(Image.fromarray(u8).resize((7, 5), Image.BICUBIC))).permute(2, 0, 1)
    assert (lr * 255 - pil.float()).abs().max() <= 1
    assert mod_crop(torch.rand(3, 70, 75), 32).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="multiple of scale"):
        make_lr(torch.rand(3, 21, 28))


def test_cufed_train_set(cufed):
    ds = CUFEDTrainSet(str(cufed), gt_size=32)
    assert len(ds) == 3
    s = ds[(1, 7)]
    assert s["hr"].shape == (3, 32, 32) and s["lr"].shape == (3, 8, 8) and s["ref"].shape == (3, 32, 32)
    assert s["name"] == "00001"
    again = ds[(1, 7)]
    assert all(torch.equal(s[k], again[k]) for k in ("hr", "lr", "ref"))  # seeded
    assert not torch.equal(ds[(1, 8)]["hr"], s["hr"])
    # the HR crop comes from the 64x64 mod-crop of the input, up to a flip / rotation
    full = (
        torch.from_numpy(np.array(Image.open(cufed / "input" / "00001.png"))).permute(2, 0, 1).float() / 255
    )
    plain = CUFEDTrainSet(str(cufed), gt_size=64, flip=False, rot90=False)[(1, 0)]
    assert torch.equal(plain["hr"], full[:, :64, :64])


def test_cufed_train_set_errors(tmp_path, cufed):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        CUFEDTrainSet(str(tmp_path))
    (tmp_path / "input").mkdir()
    (tmp_path / "ref").mkdir()
    _save(tmp_path / "input" / "a.png", 64, 64, 0)
    _save(tmp_path / "ref" / "b.png", 64, 64, 0)
    with pytest.raises(ValueError, match="no reference of the same name"):
        CUFEDTrainSet(str(tmp_path), gt_size=32)
    with pytest.raises(ValueError, match="gt_size"):
        CUFEDTrainSet(str(cufed), gt_size=30)
    with pytest.raises(ValueError, match="smaller than the crop size"):
        CUFEDTrainSet(str(cufed), gt_size=96)[0]


def test_self_reference_pairs_overlap():
    ds = SelfReferenceSet(SAMPLE_FOLDER, gt_size=64, augment_data=False, gamma_jitter=0.0)
    assert len(ds) >= 1
    idx = next(i for i, n in enumerate(ds.names) if n == "grace_hopper.jpg")
    s = ds[(idx, 3)]
    assert s["hr"].shape == (3, 64, 64) and s["ref"].shape == (3, 64, 64) and s["lr"].shape == (3, 16, 16)
    # no shift and scale 1: the reference is the HR crop itself (up to 8-bit rounding)
    same = SelfReferenceSet(
        SAMPLE_FOLDER, gt_size=64, ref_scale=(1, 1), max_shift=0, gamma_jitter=0, augment_data=False
    )
    t = same[(idx, 3)]
    assert (t["ref"] - t["hr"]).abs().max() <= 0.5 / 255 + 1e-6
    # scale 1, shifted: the reference is the photo window moved by at most max_shift * 64 = 16 pixels, so
    # some shift (dy, dx) maps it exactly onto the HR crop on their overlap
    shifted = SelfReferenceSet(
        SAMPLE_FOLDER, gt_size=64, ref_scale=(1, 1), max_shift=0.25, gamma_jitter=0, augment_data=False
    )[(idx, 4)]
    hr, ref = shifted["hr"], shifted["ref"]
    errors = {}
    for dy in range(-16, 17):
        for dx in range(-16, 17):
            a = hr[:, max(dy, 0) : 64 + min(dy, 0), max(dx, 0) : 64 + min(dx, 0)]
            b = ref[:, max(-dy, 0) : 64 + min(-dy, 0), max(-dx, 0) : 64 + min(-dx, 0)]
            errors[(dy, dx)] = (a - b).abs().max().item()
    best = min(errors, key=errors.get)
    assert errors[best] <= 0.5 / 255 + 1e-6 and best != (0, 0)
    # a scaled, gamma-jittered reference differs from the crop; the draw is seeded
    assert (s["ref"] - s["hr"]).abs().mean() > 0.01
    assert torch.equal(ds[(idx, 3)]["ref"], s["ref"])


def test_self_reference_errors(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        SelfReferenceSet(str(tmp_path))
    _save(tmp_path / "small.png", 20, 40, 0)
    with pytest.raises(ValueError, match="smaller than the crop size"):
        SelfReferenceSet(str(tmp_path), gt_size=32)[0]
    with pytest.raises(ValueError, match="ref_scale"):
        SelfReferenceSet(str(tmp_path), ref_scale=(2.0, 1.0))


def test_cufed5_test_set(cufed5, tmp_path):
    ds = CUFED5TestSet(str(cufed5))
    assert len(ds) == 2
    s = ds[1]
    assert s["name"] == "001" and s["hr"].shape == (3, 64, 96) and s["lr"].shape == (3, 16, 24)
    assert sorted(s["refs"]) == [1, 2, 3, 4, 5]
    assert all(r.shape == (3, 64, 96) for r in s["refs"].values())
    assert sorted(CUFED5TestSet(str(cufed5), levels=[1, 3])[0]["refs"]) == [1, 3]
    _save(tmp_path / "000_0.png", 64, 64, 0)
    _save(tmp_path / "000_1.png", 64, 64, 0)
    with pytest.raises(ValueError, match="lacks its references"):
        CUFED5TestSet(str(tmp_path))
    with pytest.raises(ValueError, match="levels"):
        CUFED5TestSet(str(cufed5), levels=[0])


def test_sampler_covers_epochs_and_resumes():
    n, b = 7, 2
    full = TrainBatchSampler(n, b, seed=5)
    it = iter(full)
    batches = [next(it) for _ in range(14)]  # 28 samples = 4 epochs
    flat = [i for batch in batches for i, _ in batch]
    for e in range(4):
        assert sorted(flat[e * n : (e + 1) * n]) == list(range(n))  # each epoch is a permutation
    seeds = [s for batch in batches for _, s in batch]
    assert len(set(seeds)) == len(seeds)
    resumed = iter(TrainBatchSampler(n, b, seed=5, start=9))
    assert [next(resumed) for _ in range(5)] == batches[9:]
    # two ranks split each global batch of the single-process run with batch 2b
    r0, r1 = (
        iter(TrainBatchSampler(n, b, rank=0, world_size=2, seed=5)),
        iter(TrainBatchSampler(n, b, rank=1, world_size=2, seed=5)),
    )
    single = iter(TrainBatchSampler(n, 2 * b, seed=5))
    for _ in range(5):
        assert next(r0) + next(r1) == next(single)
