"""Training: losses, the official critic, the loop (loss goes down), exact resume, two-process data
parallelism through DistributedDataParallel (gloo on CPU; single-process runs use neither). The loop is
exercised with a tiny stand-in RefSR model (fast); the real :class:`amsa.AMSA` is trained end to end in
tests/test_cli.py."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from amsa.training.config import TrainConfig, build_dataset, load_config, param_groups
from amsa.training.loop import train
from amsa.training.losses import (
    ImageDiscriminator,
    PerceptualLoss,
    gradient_penalty,
    reconstruction_loss,
    wgan_critic_loss,
    wgan_generator_loss,
)

# Facts of the official release (official_state_dict_shapes.json): the critic's size and the names of the
# restoration network's offset-related parameters (the rest of its 308 tensors contain no "offset").
OFFICIAL_DISC_PARAMS = 5_242_529
OFFICIAL_OFFSET_NAMES = [
    f"dyn_agg_restore.{scale}_{part}.{wb}"
    for scale in ("small", "medium", "large")
    for part in ("deform_conv.conv_offset_mask", "offset_conv1", "offset_conv2", "dyn_agg.conv_offset_mask")
    for wb in ("weight", "bias")
]


class TinyRefSR(nn.Module):
    """Stand-in with AMSA's interface: (lr [B,3,h,w], ref [B,3,H,W]) -> [B,3,4h,4w], trained part .net."""

    def __init__(self, ngf: int = 8):
        super().__init__()
        self.net = nn.ModuleDict(
            {
                "head": nn.Conv2d(3 + 48, ngf, 3, padding=1),
                "body": nn.Conv2d(ngf, ngf, 3, padding=1),
                "tail": nn.Conv2d(ngf, 48, 3, padding=1),
            }
        )

    def forward(self, lr, ref):
        ref_lr = F.pixel_unshuffle(F.interpolate(ref, size=[4 * s for s in lr.shape[-2:]], mode="area"), 4)
        x = torch.relu(self.net["head"](torch.cat([lr, ref_lr], 1)))
        x = torch.relu(self.net["body"](x))
        up = F.interpolate(lr, scale_factor=4, mode="bilinear", align_corners=False)
        return up + F.pixel_shuffle(self.net["tail"](x), 4)


def tiny_factory(model_cfg):
    return TinyRefSR(**model_cfg)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        # smooth random images (low-pass noise), so that SR has something to learn
        base = rng.random((12, 14, 3))
        img = np.kron(base, np.ones((6, 6, 1)))[:70, :80]
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return str(folder)


def _cfg(out_dir, folder, **kw):
    base = dict(
        out_dir=str(out_dir),
        model={"ngf": 8},
        train_data={"kind": "self_reference", "folder": folder, "gt_size": 32},
        updates=4,
        batch_size=2,
        grad_accum=2,
        w_per=0.0,
        w_adv=0.0,
        lr=1e-3,
        milestones=[3],
        num_workers=0,
        device="cpu",
        log_every=0,
        val_every=0,
        ckpt_every=0,
    )
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------------------------------------
# losses and critic


def test_discriminator_matches_official_shapes():
    d = ImageDiscriminator()
    sd = d.state_dict()
    assert sum(p.numel() for p in d.parameters()) == OFFICIAL_DISC_PARAMS
    widths = [3, 32, 64, 128, 256, 512]
    for i in range(1, 6):
        assert sd[f"conv_block{i}.0.weight"].shape == (widths[i], widths[i - 1], 3, 3)
        assert sd[f"conv_block{i}.3.weight"].shape == (widths[i], widths[i], 3, 3)
        assert sd[f"conv_block{i}.4.running_var"].shape == (widths[i],)
    assert d.conv_block3[3].stride == (2, 2) and d.conv_block3[0].stride == (1, 1)
    assert sd["out_block.1.weight"].shape == (1024, 512, 1, 1) and sd["out_block.3.weight"].shape == (
        1,
        1024,
        1,
        1,
    )
    assert len(sd) == 5 * 14 + 4
    out = d(torch.rand(2, 3, 64, 48))
    assert out.shape == (2, 1, 1, 1) and ((out > 0) & (out < 1)).all()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        d(torch.rand(2, 1, 32, 32))


def test_wgan_losses_and_gradient_penalty_against_closed_form():
    # a linear critic D(x) = <w, x> has gradient w everywhere: GP = (||w|| - 1)^2 exactly
    w = torch.randn(1, 3, 5, 7, dtype=torch.float64)

    def critic(x):
        return (x * w).flatten(1).sum(1)

    real, fake = torch.rand(4, 3, 5, 7, dtype=torch.float64), torch.rand(4, 3, 5, 7, dtype=torch.float64)
    gp = gradient_penalty(critic, real, fake, torch.rand(4, dtype=torch.float64))
    assert gp.item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-12)
    assert wgan_critic_loss(critic(real), critic(fake)).item() == pytest.approx(
        (critic(fake).mean() - critic(real).mean()).item()
    )
    assert wgan_generator_loss(critic(fake)).item() == pytest.approx(-critic(fake).mean().item())
    # quadratic critic D(x) = sum x^2 / 2: grad = x_hat, checked per sample with an independent loop
    alpha = torch.tensor([0.0, 0.3, 1.0, 0.7], dtype=torch.float64)
    gp2 = gradient_penalty(lambda x: 0.5 * x.pow(2).flatten(1).sum(1), real, fake, alpha)
    expect = np.mean(
        [(np.linalg.norm((a * r + (1 - a) * f).numpy()) - 1) ** 2 for a, r, f in zip(alpha, real, fake)]
    )
    assert gp2.item() == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ValueError, match="alpha"):
        gradient_penalty(critic, real, fake, torch.rand(3))


def test_gradient_penalty_trains_the_critic():
    d = ImageDiscriminator(ndf=4)
    real, fake = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    gradient_penalty(d, real, fake, torch.rand(2)).backward()
    assert all(p.grad is not None for p in d.parameters())


def test_perceptual_loss_is_frobenius_norm():
    conv = nn.Conv2d(3, 4, 3)

    class Extractor(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return {"relu5_1": torch.relu(self.conv(x))}

    loss = PerceptualLoss(Extractor())
    sr, hr = torch.rand(2, 3, 9, 8, requires_grad=True), torch.rand(2, 3, 9, 8)
    value = loss(sr, hr)
    diff = (torch.relu(conv(sr)) - torch.relu(conv(hr))).detach().numpy()
    assert value.item() == pytest.approx(float(np.sqrt((diff.astype(np.float64) ** 2).sum())), rel=1e-5)
    value.backward()
    assert sr.grad is not None and conv.weight.grad is None  # the extractor is frozen
    assert reconstruction_loss(sr, hr).item() == pytest.approx((sr - hr).abs().mean().item())


def test_param_groups_follow_official_offset_rule():
    names = OFFICIAL_OFFSET_NAMES + [
        "content_extractor.conv_first.weight",
        "dyn_agg_restore.small_head_large.bias",
    ]

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(torch.zeros(1)) for n in names})

        def named_parameters(self, *a, **k):
            for key, p in self.p.items():
                yield key.replace("__", "."), p

    cfg = TrainConfig(out_dir="x", train_data={"kind": "cufed"}, w_per=0.0)
    groups = {g["name"]: g for g in param_groups(Fake(), cfg)}
    assert (
        groups["offset_1x"]["lr"] == 1e-6
        and groups["offset_2x"]["lr"] == 1e-5
        and groups["base"]["lr"] == 1e-4
    )
    # 1x: small_deform_conv.conv_offset_mask, small_offset_conv1/2, small_dyn_agg.conv_offset_mask (w + b)
    assert len(groups["offset_1x"]["params"]) == 8 and len(groups["offset_2x"]["params"]) == 8
    assert len(groups["base"]["params"]) == 8 + 2
    assert sum(len(g["params"]) for g in groups.values()) == len(names)


# ----------------------------------------------------------------------------------------------------------
# the loop


def test_training_reduces_loss_on_a_fixed_batch(tmp_path, photo_folder):
    # one photo, cropped whole, no augmentation, reference = the same view: every batch is the same
    one = tmp_path / "one"
    one.mkdir()
    from PIL import Image

    Image.open(os.path.join(photo_folder, "p0.png")).crop((0, 0, 32, 32)).save(one / "p0.png")
    data = {
        "kind": "self_reference",
        "folder": str(one),
        "gt_size": 32,
        "ref_scale": [1.0, 1.0],
        "max_shift": 0.0,
        "gamma_jitter": 0.0,
        "augment_data": False,
    }
    cfg = _cfg(
        tmp_path / "run",
        photo_folder,
        train_data=data,
        updates=40,
        grad_accum=1,
        lr=1e-2,
        milestones=[],
        log_every=1,
    )
    train(cfg, model_factory=tiny_factory, log=lambda s: None)
    with open(tmp_path / "run" / "log.jsonl") as f:
        rec = [json.loads(line)["rec"] for line in f]
    assert len(rec) == 40
    assert rec[-1] < 0.8 * rec[0] and min(rec[-5:]) < min(rec[:5])
    assert os.path.isfile(tmp_path / "run" / "checkpoint.pt") and os.path.isfile(
        tmp_path / "run" / "restoration.pth"
    )


@pytest.mark.parametrize("adversarial", [False, True])
def test_resume_is_bitwise_exact(tmp_path, photo_folder, adversarial, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a single-process run must not create a process group or a DDP wrapper")

    monkeypatch.setattr(dist, "init_process_group", forbidden)
    monkeypatch.setattr(DistributedDataParallel, "__init__", forbidden)
    kw = dict(w_adv=1e-3, disc_ndf=4) if adversarial else {}
    straight = train(_cfg(tmp_path / "a", photo_folder, **kw), model_factory=tiny_factory, log=lambda s: None)
    cfg_b = _cfg(tmp_path / "b", photo_folder, **kw)
    first = train(cfg_b, stop_after=2, model_factory=tiny_factory, log=lambda s: None)
    assert first.step == 2
    torch.manual_seed(999)  # resuming must not depend on the process's RNG state
    resumed = train(
        cfg_b, resume=str(tmp_path / "b" / "checkpoint.pt"), model_factory=tiny_factory, log=lambda s: None
    )
    assert resumed.step == 4
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # and the interruption changed something: params after 2 updates differ from after 4
    assert not all(torch.equal(a, b) for a, b in zip(first.model.parameters(), resumed.model.parameters()))
    if adversarial:
        for a, b in zip(straight.disc.state_dict().values(), resumed.disc.state_dict().values()):
            assert torch.equal(a, b)


def test_a_non_finite_loss_stops_the_run(tmp_path, photo_folder):
    class NaNRefSR(TinyRefSR):
        def forward(self, lr, ref):
            return super().forward(lr, ref) * float("nan")

    with pytest.raises(FloatingPointError, match=r"^train: non-finite loss at update 0: rec nan"):
        train(_cfg(tmp_path, photo_folder), model_factory=lambda kw: NaNRefSR(**kw), log=lambda s: None)


def test_resume_rejects_a_different_config(tmp_path, photo_folder):
    train(_cfg(tmp_path, photo_folder, updates=1), model_factory=tiny_factory, log=lambda s: None)
    other = _cfg(tmp_path, photo_folder, batch_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        train(other, resume=str(tmp_path / "checkpoint.pt"), model_factory=tiny_factory, log=lambda s: None)


@pytest.mark.parametrize("change", [{"lr": 2e-3}, {"lr_offset_1x": 1e-5}, {"betas": [0.5, 0.999]},
                                    {"milestones": [2]}, {"lr_gamma": 0.5}, {"amp": "bf16"}])
def test_resume_rejects_changed_optimiser_settings(tmp_path, photo_folder, change):
    # the checkpoint's optimiser and schedule states would silently override these
    train(_cfg(tmp_path, photo_folder, updates=1), model_factory=tiny_factory, log=lambda s: None)
    with pytest.raises(ValueError, match=f"differs in \\['{next(iter(change))}'\\]"):
        train(_cfg(tmp_path, photo_folder, **change), resume=str(tmp_path / "checkpoint.pt"),
              model_factory=tiny_factory, log=lambda s: None)


def test_config_errors(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"out_dir": "o", "train_data": {"kind": "cufed"}, "w_per": 0, "lr_typo": 1}))
    with pytest.raises(ValueError, match="lr_typo"):
        load_config(str(p))
    with pytest.raises(ValueError, match="perceptual_vgg_weights"):
        TrainConfig(out_dir="o", train_data={"kind": "cufed"})
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(out_dir="o", train_data={"kind": "cufed"}, w_per=0, amp="fp8")
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "missing.json"))


_OK = {"out_dir": "o", "train_data": {"kind": "cufed"}, "w_per": 0}


@pytest.mark.parametrize("doc, message", [
    ([1, 2], "must hold a JSON object, got list"),
    ({"train_data": {"kind": "cufed"}, "w_per": 0}, r"needs the keys \['out_dir'\]"),
    ({**_OK, "lr": "fast"}, "lr in .* must be a number"),
    ({**_OK, "betas": 0.9}, "betas in .* list of 2"),
    ({**_OK, "updates": True}, "updates in .* integer"),
    ({**_OK, "train_data": []}, "train_data in .* JSON object"),
])
def test_bad_config_files_give_one_line_value_errors(tmp_path, doc, message):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as info:
        load_config(str(p))
    assert "\n" not in str(info.value)


def test_bad_dataset_entries_name_the_key(photo_folder):
    with pytest.raises(ValueError, match=r"unknown train_data keys \['gt_sise'\]"):
        build_dataset({"kind": "self_reference", "folder": photo_folder, "gt_sise": 32}, train=True)
    with pytest.raises(ValueError, match=r"val_data of kind 'cufed5' needs the keys \['root'\]"):
        build_dataset({"kind": "cufed5", "levels": [1]}, train=False)
    with pytest.raises(ValueError, match="val_data must be a JSON object"):
        build_dataset(["cufed5"], train=False)


# ----------------------------------------------------------------------------------------------------------
# two processes, gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dict, result_dir, count_allreduce):
    """One torchrun-like process; records what DDP did: the wrapped modules, ``no_sync`` entries and
    (with ``count_allreduce``, through a comm hook doing DDP's default all-reduce) the reductions."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    seen = {"wrapped": [], "no_sync": 0, "reductions": {}}
    init, no_sync = DistributedDataParallel.__init__, DistributedDataParallel.no_sync

    def counting_init(self, module, *args, **kwargs):
        init(self, module, *args, **kwargs)
        name = type(module).__name__
        seen["wrapped"].append(name)
        if count_allreduce:

            def hook(state, bucket):
                if bucket.is_last():  # every gradient of this wrapper reduced
                    seen["reductions"][name] = seen["reductions"].get(name, 0) + 1
                return allreduce_hook(state, bucket)

            self.register_comm_hook(None, hook)

    def counting_no_sync(self):
        seen["no_sync"] += 1
        return no_sync(self)

    DistributedDataParallel.__init__ = counting_init
    DistributedDataParallel.no_sync = counting_no_sync
    state = train(TrainConfig(**cfg_dict), model_factory=tiny_factory, log=lambda s: None)
    torch.save(
        {
            "net": state.model.state_dict(),
            "disc": state.disc.state_dict() if state.disc is not None else None,
            "seen": seen,
        },
        os.path.join(result_dir, f"rank{rank}.pt"),
    )


def test_two_process_data_parallel_keeps_replicas_identical(tmp_path, photo_folder):
    cfg = _cfg(tmp_path / "ddp", photo_folder, updates=3, w_adv=1e-3, disc_ndf=4, batch_size=2, grad_accum=2)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path), True), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for r in (r0, r1):
        # both the generator (the model, DDP restricted to .net) and the critic went through DDP, each
        # under no_sync for the first of its 2 micro-batches and all-reduced once per update
        seen = r["seen"]
        assert sorted(seen["wrapped"]) == ["ImageDiscriminator", "TinyRefSR"]
        assert seen["no_sync"] == 2 * cfg.updates * (cfg.grad_accum - 1)
        assert seen["reductions"] == {"ImageDiscriminator": cfg.updates, "TinyRefSR": cfg.updates}
    # official key names: no DDP "module." prefix in what train returns or saves
    assert set(r0["net"]) == set(tiny_factory(cfg.model).state_dict())
    assert set(r0["disc"]) == set(ImageDiscriminator(ndf=4).state_dict())
    ckpt = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert set(ckpt["net"]) == {k[len("net.") :] for k in r0["net"]} and set(ckpt["disc"]) == set(r0["disc"])
    weights = torch.load(tmp_path / "ddp" / "restoration.pth", weights_only=True)
    assert all(torch.equal(weights[k], r0["net"]["net." + k]) for k in weights)
    for key in r0["net"]:
        assert torch.equal(r0["net"][key], r1["net"][key]), key
    for key in r0["disc"]:
        assert torch.equal(r0["disc"][key], r1["disc"][key]), key
    # the replicas trained: they differ from the initialisation
    torch.manual_seed(cfg.seed)
    init = tiny_factory(cfg.model).state_dict()
    assert not all(torch.equal(init[k], r0["net"][k]) for k in init)


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, photo_folder):
    """L1 only: 2 processes x batch 1 see exactly the samples of 1 process x batch 2 (same global order), so
    the averaged gradients and the parameters agree up to float summation order."""
    cfg2 = _cfg(tmp_path / "two", photo_folder, updates=3, batch_size=1)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg2.to_dict(), str(tmp_path), False), nprocs=2, join=True)
    one = train(
        _cfg(tmp_path / "one", photo_folder, updates=3, batch_size=2),
        model_factory=tiny_factory,
        log=lambda s: None,
    )
    r0, seen = (torch.load(tmp_path / "rank0.pt")[k] for k in ("net", "seen"))
    # DDP's own reduction (no comm hook): the generator wrapped, no_sync on all but the last micro-batch
    assert seen["wrapped"] == ["TinyRefSR"] and seen["no_sync"] == cfg2.updates * (cfg2.grad_accum - 1)
    torch.manual_seed(cfg2.seed)
    init = tiny_factory(cfg2.model).state_dict()
    # Adam moves every weight by up to ~lr per update whatever its gradient's size, so a summation-order
    # difference in a near-zero gradient can show as a small fraction of lr: tolerance 2% of lr * updates
    moved = max((v - init[k]).abs().max().item() for k, v in one.model.state_dict().items())
    assert moved > 0.5 * cfg2.lr
    for key, value in one.model.state_dict().items():
        torch.testing.assert_close(r0[key] - init[key], value - init[key], rtol=1e-3, atol=0.02 * cfg2.lr * 3)
