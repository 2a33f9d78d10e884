"""``python -m amsa train | eval | sr`` end to end with a tiny real AMSA (ngf 8, one residual block, two
matching levels, two reference scales; random matching/VGG extractors, since no weights are downloaded)."""

import csv
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from amsa.cli import main
from amsa.evaluation.evaluate import load_model, super_resolve
from amsa.evaluation.metrics import psnr, quantize_8bit
from amsa.io import atomic_write, load_image, sample_photo_path

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM:UserWarning")

TINY_MODEL = {"ngf": 8, "n_blocks": 1, "iters": [1, 2], "ref_scales": 2}


def _write_config(path, out_dir, folder, **kw):
    cfg = {
        "out_dir": str(out_dir),
        "model": TINY_MODEL,
        "train_data": {"kind": "self_reference", "folder": folder, "gt_size": 48},
        "updates": 3,
        "batch_size": 1,
        "grad_accum": 1,
        "lr": 1e-3,
        "milestones": [],
        "w_per": 0,
        "w_adv": 1e-6,
        "disc_ndf": 4,
        "num_workers": 0,
        "device": "cpu",
        "log_every": 1,
        "val_every": 0,
        "ckpt_every": 0,
    }
    cfg.update(kw)
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-update GAN run of the tiny AMSA on the sample photos, with validation at the end."""
    root = tmp_path_factory.mktemp("run")
    val = {"kind": "self_reference", "folder": "@sample", "gt_size": 48, "max_images": 1}
    cfg = _write_config(root / "tiny.json", root / "out", "@sample", val_data=val, val_every=3)
    assert main(["train", "--config", cfg]) == 0
    return root / "out"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An LR image and a reference cut from grace_hopper.jpg."""
    root = tmp_path_factory.mktemp("photos")
    img = Image.open(sample_photo_path()).convert("RGB")
    img.crop((200, 150, 264, 214)).resize((16, 16), Image.BICUBIC).save(root / "lr.png")
    img.crop((210, 160, 266, 216)).save(root / "ref.png")  # 56x56 reference, overlapping
    img.crop((0, 0, 16, 16)).save(root / "small_ref.png")
    Image.fromarray(np.zeros((16, 16), dtype=np.int32)).save(root / "int32.tif")  # mode "I": no RGB meaning
    return root


def test_train_writes_checkpoint_weights_and_log(run):
    for name in ("checkpoint.pt", "restoration.pth", "config.json", "log.jsonl"):
        assert os.path.isfile(run / name), name
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    updates = [line for line in lines if "rec" in line]
    assert [line["update"] for line in updates] == [1, 2, 3]
    assert all(np.isfinite(line[k]) for line in updates for k in ("rec", "adv", "critic", "gp"))
    assert any("val_psnr" in line and np.isfinite(line["val_psnr"]) for line in lines)
    sd = torch.load(run / "restoration.pth", weights_only=True)
    assert any(k.startswith("dyn_agg_restore.small_offset_conv1") for k in sd)  # official names
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("checkpoint.pt", "restoration.pth", "config.json"):  # atomic outputs: not mkstemp's 0600
        assert stat.S_IMODE(os.stat(run / name).st_mode) == 0o666 & ~mask, name


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_a_new_file_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "out.txt", lambda p: open(p, "w").close())
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(old)
    got = stat.S_IMODE(os.stat(tmp_path / "out.txt").st_mode)
    assert got == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)


def test_training_amsa_reduces_loss_on_a_fixed_batch(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    Image.open(sample_photo_path()).convert("RGB").crop((200, 150, 248, 198)).save(one / "face.png")
    data = {
        "kind": "self_reference",
        "folder": str(one),
        "gt_size": 48,
        "ref_scale": [1.0, 1.0],
        "max_shift": 0.0,
        "gamma_jitter": 0.0,
        "augment_data": False,
    }
    cfg = _write_config(
        tmp_path / "c.json", tmp_path / "out", str(one), train_data=data, updates=12, w_adv=0, lr=1e-3
    )
    assert main(["train", "--config", cfg]) == 0
    rec = [json.loads(line)["rec"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    # the residual branch starts near zero (output ~ bilinear LR-up), so the first updates move slowly
    assert len(rec) == 12 and min(rec[-3:]) < 0.97 * rec[0] and max(rec[-4:]) < min(rec[:4])


def test_resume_auto_continues(run, tmp_path):
    cfg = json.loads((run / "config.json").read_text())
    cfg["updates"] = 4
    path = tmp_path / "more.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="cannot resume"):  # w_adv differs from the checkpoint's
        bad = dict(cfg, w_adv=0.0)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        main(["train", "--config", str(tmp_path / "bad.json"), "--resume", str(run / "checkpoint.pt")])
    # a copy of the run, resumed for one more update
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("checkpoint.pt", "config.json"):
        (out / name).write_bytes((run / name).read_bytes())
    assert main(["train", "--config", str(path), "--resume", "auto", "--out", str(out)]) == 0
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["update"] == 4


def test_sr_matches_the_library(run, photos, tmp_path):
    out = tmp_path / "sr.png"
    argv = [
        "sr",
        "--lr",
        str(photos / "lr.png"),
        "--ref",
        str(photos / "ref.png"),
        "--weights",
        str(run / "restoration.pth"),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    got = load_image(out)
    assert got.shape == (1, 3, 64, 64)
    model = load_model(str(run / "restoration.pth"))
    expect = quantize_8bit(
        super_resolve(model, load_image(photos / "lr.png"), [load_image(photos / "ref.png")])
    )
    assert torch.isinf(psnr(got, expect, crop_border=0)).all()  # identical 8-bit images
    # two references
    assert main(argv + ["--ref", str(photos / "ref.png")]) == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--lr": "missing.png"}, "no such file"),
        ({"--ref": "small_ref.png"}, "smaller than"),
        ({"--lr": "int32.tif"}, "no faithful 8-bit RGB"),
        ({"--out": "sr.xyz"}, "unknown image extension"),
        ({"--weights": "missing.pth"}, "does not exist"),
        ({"--model-config": "wide.json"}, "do not fit"),
    ],
)
def test_sr_bad_input_fails_clearly_and_writes_nothing(run, photos, tmp_path, change, message):
    (photos / "wide.json").write_text(json.dumps(dict(TINY_MODEL, ngf=16)))
    args = {
        "--lr": "lr.png",
        "--ref": "ref.png",
        "--weights": str(run / "restoration.pth"),
        "--out": "sr.png",
    }
    args.update(change)
    argv = ["sr"]
    for k, v in args.items():
        argv += [k, str(tmp_path / v) if k == "--out" else str(photos / v) if k != "--weights" else v]
    if "--model-config" in change:
        argv[-1] = str(photos / change["--model-config"])
    with pytest.raises(SystemExit, match=message):
        main(argv)
    assert os.listdir(tmp_path) == []  # no output, no temporary file


def test_eval_cufed5_per_level(run, tmp_path):
    photo = Image.open(sample_photo_path()).convert("RGB")
    root = tmp_path / "CUFED5"
    root.mkdir()
    for i, (y, x) in enumerate([(150, 200), (300, 100)]):
        photo.crop((x, y, x + 64, y + 64)).save(root / f"{i:03d}_0.png")
        for k in range(1, 6):  # references drift further away with the level
            d = 8 * k
            photo.crop((x + d, y + d, x + d + 64, y + d + 64)).save(root / f"{i:03d}_{k}.png")
    out_csv = tmp_path / "res.csv"
    argv = [
        "eval",
        "--weights",
        str(run / "restoration.pth"),
        "--cufed5",
        str(root),
        "--levels",
        "1",
        "3",
        "--csv",
        str(out_csv),
        "--save-dir",
        str(tmp_path / "sr"),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    rows = list(csv.DictReader(out_csv.open()))
    per_image = [r for r in rows if r["name"] != "mean"]
    assert [(r["name"], r["level"]) for r in per_image] == [
        ("000", "1"),
        ("000", "3"),
        ("001", "1"),
        ("001", "3"),
    ]
    means = {r["level"]: float(r["psnr"]) for r in rows if r["name"] == "mean"}
    assert means["1"] == pytest.approx(
        np.mean([float(r["psnr"]) for r in per_image if r["level"] == "1"]), abs=1e-3
    )
    # the saved SR image gives the tabulated PSNR
    sr = load_image(tmp_path / "sr" / "000_L1.png")
    hr = load_image(root / "000_0.png")
    assert float(psnr(sr, hr)) == pytest.approx(float(per_image[0]["psnr"]), abs=1e-3)


def test_eval_self_reference_folder(run, tmp_path):
    argv = [
        "eval",
        "--weights",
        str(run / "restoration.pth"),
        "--self-ref",
        "@sample",
        "--gt-size",
        "48",
        "--max-images",
        "1",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    with pytest.raises(SystemExit, match="no such folder"):
        main(argv[:4] + [str(tmp_path / "nope")] + argv[5:])


def test_train_extractor_and_eval_extractor(tmp_path, capsys):
    """Both extractor commands end to end on the tiny preset; a bad config fails with one line."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = os.path.join(repo, "configs", "tiny_extractor.json")
    assert main(["train-extractor", "--config", cfg, "--out", str(tmp_path / "ext")]) == 0
    weights = tmp_path / "ext" / "feature_extraction.pth"
    assert weights.is_file() and (tmp_path / "ext" / "checkpoint.pt").is_file()
    capsys.readouterr()
    assert main(["eval-extractor", "--config", cfg, "--feature-weights", str(weights),
                 "--json", str(tmp_path / "acc.json")]) == 0
    text = capsys.readouterr().out
    assert "filter bank" in text and "random shared" in text
    got = json.loads((tmp_path / "acc.json").read_text())
    assert set(got) >= {"learned", "filter bank", "random", "random shared"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"out_dir": str(tmp_path / "x"), "stage": "student", "train_data": {
        "kind": "photos", "folder": "@sample"}}))
    with pytest.raises(SystemExit, match="teacher_weights"):
        main(["train-extractor", "--config", str(bad)])



@pytest.mark.parametrize("command", ["train", "train-extractor"])
def test_a_config_that_is_no_object_fails_in_one_line(tmp_path, command):
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit, match=f"amsa {command}: error: .* must hold a JSON object") as info:
        main([command, "--config", str(bad)])
    assert "\n" not in str(info.value)


def test_demo_bad_input_fails_in_one_line(tmp_path):
    # a ValueError of the demo is bad input like the other commands': one line, no traceback
    with pytest.raises(SystemExit, match=r"^amsa demo: error: demo_pair: hr_size 1024 exceeds the photo"):
        main(["demo", "--size", "1024", "--out", str(tmp_path / "demo")])
