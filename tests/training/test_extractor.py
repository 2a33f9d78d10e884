"""Training the matching extractor: both stages end to end (the output loads strictly into AMSA), the
loss falls on a fixed batch, a resumed run equals an uninterrupted one bitwise, config errors, and the
committed small extractor reproduces the validation figures recorded beside it."""

import json
import os
import warnings

import pytest
import torch

from amsa.models import AMSA, ContrasExtractorSep
from amsa.models.extractors import LEARNED_FEATURE_WEIGHTS
from amsa.training.config import load_config
from amsa.training.contrastive import pair_losses
from amsa.training.correspondence import KnownPair, correspondence_accuracy
from amsa.training.extractor import ExtractorTrainer, new_extractor, train_extractor
from amsa.training.extractor_config import ExtractorConfig, build_pair_dataset, validation_geometry
from amsa.training.pairs import feature_correspondences

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = {"kind": "photos", "folder": "@sample", "files": ["grace_hopper.jpg"]}


def _cfg(out_dir, **kw):
    base = dict(out_dir=str(out_dir), train_data={**SAMPLE, "gt_size": 48, "scale": [0.9, 1.1],
                                                  "max_shift": 0.05},
                updates=3, batch_size=2, min_correspondences=16, border=4.0, num_workers=0, log_every=1,
                val_every=0, ckpt_every=0, seed=3)
    base.update(kw)
    return ExtractorConfig(**base)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    net = new_extractor(None)
    data = build_pair_dataset({**SAMPLE, "gt_size": 48, "scale": [0.9, 1.1]})
    batch = [data[(0, s)] for s in (1, 2)]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def loss():
        total = 0.0
        for s in batch:
            f1, f2 = net(s["img_in"][None], s["img_ref"][None])
            idx1, pos2 = feature_correspondences(s["homography"], (12, 12), (12, 12), border=4.0)
            t = pair_losses((f1[0], f2[0]), idx1, pos2, margin=1.0, safe_radius=4, nce=True)
            total = total + t.contrastive + t.nce
        return total / len(batch)

    first = loss()
    for _ in range(6):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < first.item() - 0.05


def test_random_start_has_equal_branches():
    torch.manual_seed(0)
    net = new_extractor(None)
    a, b = net.feature_extraction_image1.state_dict(), net.feature_extraction_image2.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and all(p.requires_grad for p in net.parameters())


def test_teacher_then_student_end_to_end(tmp_path):
    teacher = train_extractor(_cfg(tmp_path / "t", nce_weight=1.0), log=lambda s: None)
    assert teacher.step == 3
    t_weights = tmp_path / "t" / "feature_extraction.pth"
    lines = [json.loads(x) for x in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    assert [x["update"] for x in lines] == [1, 2, 3] and all("nce" in x and "loss" in x for x in lines)
    val = {**SAMPLE, "gt_size": 96, "per_image": 1, "seed": 1, "max_shift": 0.05}
    student = train_extractor(_cfg(tmp_path / "s", stage="student", teacher_weights=str(t_weights),
                                   val_data=val, val_every=3), log=lambda s: None)
    lines = [json.loads(x) for x in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    assert all("distill" in x for x in lines if "loss" in x)
    assert 0.0 <= student.last_val["within2_exact"] <= 100.0 and student.last_val["cells"] > 0
    # the output is the official layout: AMSA loads it with strict=True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AMSA(ngf=8, n_blocks=1, feature_weights=str(tmp_path / "s" / "feature_extraction.pth"))
    trained = student.net.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.matching_extractor.state_dict().items())


def test_resume_equals_an_uninterrupted_run(tmp_path):
    full = train_extractor(_cfg(tmp_path / "a", updates=4, nce_weight=1.0), log=lambda s: None)
    train_extractor(_cfg(tmp_path / "b", updates=4, nce_weight=1.0), stop_after=2, log=lambda s: None)
    resumed = train_extractor(_cfg(tmp_path / "b", updates=4, nce_weight=1.0),
                              resume=str(tmp_path / "b" / "checkpoint.pt"), log=lambda s: None)
    assert resumed.step == 4
    a, b = full.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="differs in"):
        train_extractor(_cfg(tmp_path / "b", updates=4, nce_weight=2.0),
                        resume=str(tmp_path / "b" / "checkpoint.pt"), log=lambda s: None)
    for change in ({"lr": 2e-3}, {"milestones": [2]}):  # the saved optimiser/schedule would override these
        with pytest.raises(ValueError, match=f"differs in \\['{next(iter(change))}'\\]"):
            train_extractor(_cfg(tmp_path / "b", updates=4, nce_weight=1.0, **change),
                            resume=str(tmp_path / "b" / "checkpoint.pt"), log=lambda s: None)


def test_resume_drops_the_log_lines_written_after_the_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, updates=4)
    train_extractor(cfg, stop_after=2, log=lambda s: None)
    log = tmp_path / "log.jsonl"
    with open(log, "a") as f:  # a crash after update 3's progress line, before its checkpoint
        f.write(json.dumps({"update": 3, "loss": 1.0}) + "\n" + '{"update": 4, "lo')
    train_extractor(cfg, resume=str(tmp_path / "checkpoint.pt"), log=lambda s: None)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["update"] for x in lines] == [1, 2, 3, 4]
    assert lines[2]["loss"] != 1.0  # the rewritten update 3


def test_correspondence_accuracy_moves_the_images_to_the_features_device():
    # held-out pairs are built on CPU; a module on another device (here 'meta') must receive them there
    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))
            self.seen = []

        def forward(self, lr_up, ref):
            self.seen.append((lr_up.device.type, ref.device.type))
            raise StopIteration("recorded")

    pair = KnownPair("p", torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), torch.zeros(4, 4, 2),
                     torch.ones(4, 4, dtype=torch.bool))
    features = Recording()
    with pytest.raises(StopIteration, match="recorded"):
        correspondence_accuracy(features, [pair])
    assert features.seen == [("meta", "meta")]


def test_a_failing_validation_keeps_the_update_checkpoint(tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(ExtractorTrainer, "validate", broken)
    val = {**SAMPLE, "gt_size": 96, "per_image": 1, "seed": 1, "max_shift": 0.05}
    with pytest.raises(RuntimeError, match="validation broke"):
        train_extractor(_cfg(tmp_path, val_data=val, val_every=2, ckpt_every=2), log=lambda s: None)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="teacher_weights"):
        _cfg(tmp_path, stage="student")
    with pytest.raises(ValueError, match="stage"):
        _cfg(tmp_path, stage="pupil")
    with pytest.raises(ValueError, match="kind"):
        ExtractorConfig(out_dir=str(tmp_path), train_data={"folder": "x"})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"out_dir": "x", "train_data": SAMPLE, "margn": 1}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(str(path), ExtractorConfig, what="train-extractor")
    with pytest.raises(ValueError, match=r"unknown val_data keys \['per_imag'\]"):
        validation_geometry({**SAMPLE, "per_imag": 1})
    geometry = validation_geometry({**SAMPLE, "per_image": 1, "max_shift": 0.1})
    assert geometry == {"per_image": 1, "max_shift": 0.1}


@pytest.mark.parametrize("name", ["extractor_teacher", "extractor_student", "extractor_small_teacher",
                                  "extractor_small_student", "tiny_extractor"])
def test_presets_parse(name):
    cfg = load_config(os.path.join(REPO, "configs", f"{name}.json"), ExtractorConfig, what="train-extractor")
    if name == "extractor_teacher":  # the official stage 1
        assert (cfg.updates, cfg.batch_size, cfg.lr, cfg.margin, cfg.safe_radius) == (5000, 8, 1e-3, 1.0, 4)
    if name == "extractor_student":  # the official stage 2
        assert (cfg.updates, cfg.distill_weight, cfg.temperature) == (75000, 15, 0.15)
        assert cfg.milestones == (72545,)


def test_committed_weights_load_and_reproduce_their_note():
    """The shipped extractor loads strictly (as '@learned') and matches the held-out grace_hopper pairs
    of its config as recorded in amsa/weights/feature_extraction_small.json (within 0.5 points: near-ties
    of differently blocked matrix products may move a few cells on another CPU)."""
    from amsa.training.correspondence import baselines, correspondence_accuracy, homography_pairs
    from amsa.training.extractor_config import pair_paths, validation_geometry

    note = json.loads(open(os.path.splitext(LEARNED_FEATURE_WEIGHTS)[0] + ".json").read())
    ContrasExtractorSep(weights="@learned")
    cfg = load_config(os.path.join(REPO, note["config"]), ExtractorConfig, what="train-extractor")
    pairs = homography_pairs(pair_paths(cfg.val_data), **validation_geometry(cfg.val_data))
    feats = baselines("@learned")
    for name in ("learned", "filter bank"):
        acc = correspondence_accuracy(feats[name], pairs)
        assert acc.exact == pytest.approx(note["validation"][name]["within2_exact"], abs=0.5)
        assert acc.cfe == pytest.approx(note["validation"][name]["within2_cfe"], abs=0.5)
    assert note["validation"]["learned"]["within2_exact"] > note["validation"]["filter bank"]["within2_exact"]
