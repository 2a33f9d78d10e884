"""Training AMSA (paper section 3.3 and 4.2): ``python -m amsa train --config FILE``.

One process per device. On one device run it directly (no process group, no wrapper); on several GPUs
launch it with ``torchrun --nproc_per_node=N -m amsa train --config FILE``: each process takes
``batch_size`` samples per micro-batch and the trained modules are wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` (DDP; NCCL on GPUs, gloo on CPU). The first
``grad_accum - 1`` micro-batches of an update run under ``no_sync()``, so gradients accumulate locally and
DDP all-reduces them once per update, bucket by bucket while the last micro-batch's backward is still
running; every replica then takes the same optimiser step. The gradient is the mean over processes of
each process's ``sum over micro-batches of loss / grad_accum`` (global batch ``N x batch_size x
grad_accum``). DDP wraps:

* the generator: the whole model goes through DDP (its forward must, for DDP's bookkeeping) but DDP
  ignores every parameter and buffer outside ``model.net``, so only the restoration network is broadcast
  at start and reduced; the frozen extractors are left alone;
* the critic, WGAN-GP included: the penalty takes ``autograd.grad`` w.r.t. the critic's *input* (not its
  parameters, which DDP does not support) and the following ``backward`` of ``critic + gp_weight * GP``
  reaches every critic parameter once, so DDP's hooks see ordinary ``.grad`` accumulation (the gradients
  equal a hand all-reduce of the local ones). The generator's adversarial term calls the bare critic
  (frozen), outside DDP.

DDP's per-forward buffer broadcast is off: it copies rank 0's buffers at the *start* of each forward, so
the replicas' BatchNorm statistics would still differ after the last forward (and in checkpoints), at one
broadcast per critic forward. Instead floating-point buffers (the critic's BN running statistics) are
averaged over the processes after every update, which keeps the replicas bitwise identical.

One *update* = ``grad_accum`` micro-batches on every process, then one step of each optimiser:

* critic (if ``w_adv > 0``): ``D(SR) - D(HR) + gp_weight * GP`` (WGAN-GP), Adam;
* generator (the restoration network ``model.net``, the only trained part of :class:`amsa.AMSA`):
  ``w_rec * L1 + w_per * ||VGG19_relu5_1(SR) - VGG19_relu5_1(HR)||_F - w_adv * D(SR)``, Adam with the
  official per-parameter learning rates (offset convs of the 1x scale ``lr_offset_1x``, 2x ``lr_offset_2x``),
  MultiStepLR over updates for both.

All randomness is explicit (data order and augmentation from :class:`amsa.data.TrainBatchSampler`, the
gradient penalty's mixing weights from a generator seeded by the update and micro-batch), and a checkpoint
holds model, critic, optimisers, schedulers, RNG states and the update counter (the bare modules' state
dicts, official key names, never DDP's ``module.`` ones), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from amsa.data import CUFED5TestSet, CUFEDTrainSet, SelfReferenceSet, TrainBatchSampler
from amsa.evaluate import atomic_write, evaluate, read_json
from amsa.losses import (
    ImageDiscriminator,
    PerceptualLoss,
    gradient_penalty,
    reconstruction_loss,
    wgan_critic_loss,
    wgan_generator_loss,
)

__all__ = ["TrainConfig", "TrainState", "build_dataset", "load_config", "param_groups", "train"]

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "restoration.pth"


@dataclass
class TrainConfig:
    """Everything a training run depends on (a JSON file's keys; unknown keys are errors).

    Attributes:
        out_dir: folder for ``checkpoint.pt`` (full state), ``restoration.pth`` (the network's weights,
            official layout), ``log.jsonl`` and ``config.json``.
        model: keyword arguments of :class:`amsa.AMSA` (``ngf``, ``n_blocks``, ``feature_weights``,
            ``vgg_weights``, ``weights`` to start from, ...).
        train_data: ``{"kind": "cufed", "root": ...}`` or ``{"kind": "self_reference", "folder": ...}``
            plus the dataset's keyword arguments (``gt_size``, ``flip``, ``rot90``, ...).
        val_data: ``None`` or ``{"kind": "cufed5", "root": ..., "levels": [1]}`` or
            ``{"kind": "self_reference", "folder": ...}``, with ``"max_images"`` (default all).
        updates: optimiser steps in total (official: 255k = 765k iterations / 3).
        batch_size: samples per micro-batch per process (official 3).
        grad_accum: micro-batches per update (official 3).
        lr, lr_offset_1x, lr_offset_2x: generator learning rates (official 1e-4, 1e-6, 1e-5).
        lr_d: critic learning rate.
        betas: Adam betas (official (0.9, 0.999)).
        milestones, lr_gamma: MultiStepLR over updates (official [72545, 211040] and 0.1).
        w_rec, w_per, w_adv: loss weights (paper 1, 1e-4, 1e-6; ``-rec``: 1, 0, 0).
        gp_weight: WGAN-GP weight (10).
        perceptual_vgg_weights: local VGG19 weights (torchvision or official layout) for ``L_per``;
            required when ``w_per > 0``.
        disc_ndf: critic base width (32).
        amp: ``"off"`` or ``"bf16"`` (the generator's forward under bf16 autocast; losses in fp32).
        seed: seeds initialisation, data order, augmentation and the gradient penalty.
        num_workers: data-loader worker processes per training process.
        device: ``"auto"`` (the process's GPU if any, else CPU), ``"cpu"`` or ``"cuda"``.
        log_every, val_every, ckpt_every: in updates (0 = never; a checkpoint is also written at the end).
    """

    out_dir: str
    model: dict = field(default_factory=dict)
    train_data: dict = field(default_factory=dict)
    val_data: dict | None = None
    updates: int = 255_000
    batch_size: int = 3
    grad_accum: int = 3
    lr: float = 1e-4
    lr_offset_1x: float = 1e-6
    lr_offset_2x: float = 1e-5
    lr_d: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    milestones: tuple[int, ...] = (72_545, 211_040)
    lr_gamma: float = 0.1
    w_rec: float = 1.0
    w_per: float = 1e-4
    w_adv: float = 1e-6
    gp_weight: float = 10.0
    perceptual_vgg_weights: str | None = None
    disc_ndf: int = 32
    amp: str = "off"
    seed: int = 0
    num_workers: int = 4
    device: str = "auto"
    log_every: int = 100
    val_every: int = 5000
    ckpt_every: int = 5000

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.milestones = tuple(self.milestones)
        positive = ("updates", "batch_size", "grad_accum")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {v!r}")
        for name in ("w_rec", "w_per", "w_adv", "gp_weight", "lr", "lr_offset_1x", "lr_offset_2x", "lr_d"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0, got {getattr(self, name)}")
        if self.amp not in ("off", "bf16"):
            raise ValueError(f"TrainConfig: amp must be 'off' or 'bf16', got {self.amp!r}")
        if self.w_per > 0 and not self.perceptual_vgg_weights:
            raise ValueError(
                "TrainConfig: w_per > 0 needs perceptual_vgg_weights (a local VGG19 state dict): the "
                "perceptual loss of random VGG features is meaningless"
            )
        if "kind" not in self.train_data:
            raise ValueError("TrainConfig: train_data needs a 'kind' ('cufed' or 'self_reference')")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig: device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str, **overrides: object) -> TrainConfig:
    """Read a JSON config; ``overrides`` (e.g. ``out_dir``) replace its keys. Unknown keys are errors."""
    raw = read_json(path, "train: config file")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"train: unknown keys {unknown} in {path!r}; valid keys: {sorted(known)}")
    return TrainConfig(**raw)


def build_dataset(spec: dict, *, train: bool) -> torch.utils.data.Dataset:
    """A dataset from a config entry ``{"kind": ..., <constructor arguments>}`` (``max_images`` ignored)."""
    args = {k: v for k, v in spec.items() if k not in ("kind", "max_images")}
    kind = spec.get("kind")
    if kind == "cufed" and train:
        return CUFEDTrainSet(**args)
    if kind == "cufed5" and not train:
        return CUFED5TestSet(**args)
    if kind == "self_reference":
        if not train:
            args.setdefault("augment_data", False)
        return SelfReferenceSet(**args)
    valid = "'cufed', 'self_reference'" if train else "'cufed5', 'self_reference'"
    raise ValueError(f"train: data kind {kind!r} is not valid here; use one of {valid}")


def param_groups(net: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Adam parameter groups with the official learning rates.

    As in the official release, a parameter whose name contains ``offset`` and ``small`` (the 1x feature
    scale: ``dyn_agg_restore.small_offset_conv1``, ``small_deform_conv.conv_offset_mask``, ...) gets
    ``lr_offset_1x``; ``offset`` and ``medium`` (2x) ``lr_offset_2x``; everything else ``lr``.
    """
    groups: dict[str, list[nn.Parameter]] = {"base": [], "offset_1x": [], "offset_2x": []}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if "offset" in name and "small" in name:
            groups["offset_1x"].append(p)
        elif "offset" in name and "medium" in name:
            groups["offset_2x"].append(p)
        else:
            groups["base"].append(p)
    lrs = {"base": cfg.lr, "offset_1x": cfg.lr_offset_1x, "offset_2x": cfg.lr_offset_2x}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


@dataclass
class TrainState:
    """What :func:`train` returns: the trained model and critic and the update count reached."""

    model: nn.Module
    disc: nn.Module | None
    step: int
    last_val_psnr: float | None


def _default_model_factory(model_cfg: dict) -> nn.Module:
    from amsa.model import AMSA

    return AMSA(**model_cfg)


def _trained_net(model: nn.Module) -> nn.Module:
    net = getattr(model, "net", None)
    if not isinstance(net, nn.Module):
        raise TypeError(f"train: the model ({type(model).__name__}) must hold its trained network as .net")
    return net


class _Dist:
    """The process group of a ``torchrun`` launch (world size 1 without one)."""

    def __init__(self, device_kind: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors over processes in place (one flat all-reduce)."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast_buffers_(self, module: nn.Module) -> None:
        """Rank 0's buffers to every process (DDP broadcasts the parameters when it wraps a module)."""
        if self.world > 1:
            for t in module.buffers():
                dist.broadcast(t.data, 0)

    def wrap(self, module: nn.Module, device: torch.device, only: nn.Module | None = None) -> nn.Module:
        """``module`` in :class:`DistributedDataParallel` (``module`` itself in a single process).

        ``only``: a submodule of ``module``; DDP then ignores (neither broadcasts nor reduces) every
        parameter and buffer outside it. Unused parameters are not searched for (every trained parameter
        gets a gradient each micro-batch), and buffers are not broadcast at each forward (see the module
        docstring).
        """
        if self.world == 1:
            return module
        if only is not None:
            prefix = next(name for name, m in module.named_modules() if m is only)
            inside = prefix + "."
            ignore = [
                name
                for name, _ in [*module.named_parameters(), *module.named_buffers()]
                if not name.startswith(inside)
            ]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            **_DDP_NO_FORWARD_BUFFER_SYNC,
        )

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


# Turn off DDP's buffer broadcast at every forward (torch >= 2.13 names it forward_sync_buffers and
# deprecates broadcast_buffers; older releases only know broadcast_buffers).
_DDP_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def _no_sync(module: nn.Module):
    """DDP's ``no_sync()`` (no all-reduce in this backward; gradients accumulate locally) or nothing."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) else nullcontext()


def _unwrap(module: nn.Module | None) -> nn.Module | None:
    """The bare module under a DDP wrapper (whose state-dict keys would carry a ``module.`` prefix)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def _resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train: device 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _rng_state() -> dict:
    """Global RNG states as tensors and plain values, so checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Config entries a resumed run must share with the checkpoint (they change what the run computes).
_RESUME_KEYS = ("model", "train_data", "batch_size", "grad_accum", "seed", "w_rec", "w_per", "w_adv")


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 86400}d {s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train(
    cfg: TrainConfig,
    *,
    resume: str | None = None,
    stop_after: int | None = None,
    model_factory: Callable[[dict], nn.Module] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainState:
    """Run (or resume) training as configured; see the module docstring.

    Args:
        cfg: the run's configuration.
        resume: a ``checkpoint.pt`` to continue from (its config must match ``cfg`` on model, data, batch,
            accumulation, seed and loss weights, and it must come from the same number of processes).
        stop_after: stop (with a checkpoint) once this many updates are done, as an interruption would;
            the learning-rate schedule still follows ``cfg.updates``.
        model_factory: builds the model from ``cfg.model`` (default :class:`amsa.AMSA`); the model must
            map ``(lr [B,3,h,w], ref [B,3,H,W])`` to ``[B,3,4h,4w]`` and hold its trained part as ``.net``.
        log: where progress lines go on the main process (default: print).
    """
    device_kind = (
        "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    pg = _Dist(device_kind)
    try:
        return _train(cfg, pg, resume, stop_after, model_factory or _default_model_factory, log or print)
    finally:
        pg.close()


def _train(
    cfg: TrainConfig,
    pg: _Dist,
    resume: str | None,
    stop_after: int | None,
    model_factory: Callable[[dict], nn.Module],
    log: Callable[[str], None],
) -> TrainState:
    device = _resolve_device(cfg, pg.local_rank)
    torch.manual_seed(cfg.seed)
    model = model_factory(dict(cfg.model)).to(device)
    net = _trained_net(model)
    adversarial = cfg.w_adv > 0
    disc = ImageDiscriminator(ndf=cfg.disc_ndf).to(device) if adversarial else None
    perceptual = None
    if cfg.w_per > 0:
        from amsa.extractors import VGGFeatures

        vgg = VGGFeatures("vgg19", ("relu5_1",), weights=cfg.perceptual_vgg_weights)
        perceptual = PerceptualLoss(vgg).to(device)

    opt_g = torch.optim.Adam(param_groups(net, cfg), lr=cfg.lr, betas=cfg.betas)
    sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, list(cfg.milestones), cfg.lr_gamma)
    opt_d = sched_d = None
    if disc is not None:
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr_d, betas=cfg.betas)
        sched_d = torch.optim.lr_scheduler.MultiStepLR(opt_d, list(cfg.milestones), cfg.lr_gamma)

    step = 0
    if resume is not None:
        step = _load_checkpoint(resume, cfg, pg, net, disc, opt_g, opt_d, sched_g, sched_d)
        if pg.main:
            log(f"resumed from {resume} at update {step}")
    # identical replicas: DDP broadcasts rank 0's parameters when it wraps; buffers here
    pg.broadcast_buffers_(net)
    if disc is not None:
        pg.broadcast_buffers_(disc)
    # what the loop calls: DDP wrappers with several processes, the bare modules with one; checkpoints and
    # the returned state always use the bare modules (official key names)
    g_model = pg.wrap(model, device, only=net)
    d_model = pg.wrap(disc, device) if disc is not None else None
    wrappers = [w for w in (d_model, g_model) if w is not None]

    dataset = build_dataset(cfg.train_data, train=True)
    sampler = TrainBatchSampler(
        len(dataset),
        cfg.batch_size,
        rank=pg.rank,
        world_size=pg.world,
        seed=cfg.seed,
        start=step * cfg.grad_accum,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    val_set = build_dataset(cfg.val_data, train=False) if cfg.val_data and pg.main else None

    if pg.main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        config_path = os.path.join(cfg.out_dir, "config.json")
        atomic_write(config_path, lambda p: _write_json(p, cfg.to_dict()))
        n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
        log(
            f"training {type(model).__name__}: {n_train:,} trained parameters, {len(dataset)} training "
            f"items, {pg.world} process(es) x {cfg.batch_size} x {cfg.grad_accum} accumulation = "
            f"{pg.world * cfg.batch_size * cfg.grad_accum} samples per update, device {device}"
        )

    end = cfg.updates if stop_after is None else min(cfg.updates, stop_after)
    model.train()
    if disc is not None:
        disc.train()
    batches = iter(loader)
    last_val: float | None = None
    t0, step0 = time.time(), step
    while step < end:
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            with ExitStack() as no_sync:
                # all but the last micro-batch: accumulate locally; the last one's backward all-reduces
                if micro < cfg.grad_accum - 1:
                    for w in wrappers:
                        no_sync.enter_context(_no_sync(w))
                batch = next(batches)
                lr_img, ref, hr = (batch[k].to(device, non_blocking=True) for k in ("lr", "ref", "hr"))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                    sr = g_model(lr_img, ref)
                sr = sr.float()
                terms: dict[str, torch.Tensor] = {}
                if disc is not None:
                    # critic on the current output (detached), then the generator against the frozen critic
                    g = torch.Generator().manual_seed(
                        cfg.seed * 2**32 + (step * cfg.grad_accum + micro) * pg.world + pg.rank
                    )
                    alpha = torch.rand(hr.shape[0], generator=g).to(device)
                    l_critic = wgan_critic_loss(d_model(hr), d_model(sr.detach()))
                    l_gp = gradient_penalty(d_model, hr, sr, alpha)
                    ((l_critic + cfg.gp_weight * l_gp) / cfg.grad_accum).backward()
                    terms["critic"], terms["gp"] = l_critic.detach(), l_gp.detach()
                    disc.requires_grad_(False)
                loss = torch.zeros((), device=device)
                if cfg.w_rec > 0:
                    terms["rec"] = reconstruction_loss(sr, hr)
                    loss = loss + cfg.w_rec * terms["rec"]
                if perceptual is not None:
                    terms["per"] = perceptual(sr, hr)
                    loss = loss + cfg.w_per * terms["per"]
                if disc is not None:
                    # the bare critic: frozen here, so nothing of it is reduced
                    terms["adv"] = wgan_generator_loss(disc(sr))
                    loss = loss + cfg.w_adv * terms["adv"]
                (loss / cfg.grad_accum).backward()
                if disc is not None:
                    disc.requires_grad_(True)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"train: non-finite loss at update {step}: {_fmt_terms(terms)}")
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum

        # the gradients are now averaged over the processes (DDP, in the last micro-batch's backward)
        for module, opt, sched in ((disc, opt_d, sched_d), (net, opt_g, sched_g)):
            if module is None:
                continue
            for p in module.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            # BN running statistics of the critic differ per process; keep the replicas identical
            pg.average_([b for b in module.buffers() if b.is_floating_point()])
        step += 1

        if pg.main and cfg.log_every and (step % cfg.log_every == 0 or step == end):
            rate = (step - step0) / max(time.time() - t0, 1e-9)
            line = {"update": step, **sums, "lr": sched_g.get_last_lr()[0]}
            _append_jsonl(os.path.join(cfg.out_dir, "log.jsonl"), line)
            log(
                f"[{step}/{cfg.updates}] {_fmt_terms(sums)} | lr {line['lr']:.2e} | {rate:.2f} upd/s | "
                f"ETA {_fmt_eta((cfg.updates - step) / rate if rate > 0 else float('inf'))}"
            )
        if cfg.val_every and (step % cfg.val_every == 0 or step == end) and cfg.val_data:
            if pg.main:
                last_val = _validate(model, val_set, cfg, step, log)
            pg.barrier()
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == end:
            if pg.main:
                _save_checkpoint(cfg, pg, step, net, disc, opt_g, opt_d, sched_g, sched_d)
            pg.barrier()
    return TrainState(model=model, disc=disc, step=step, last_val_psnr=last_val)


def _fmt_terms(terms: dict) -> str:
    return " ".join(f"{k} {float(v):.4g}" for k, v in terms.items())


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _append_jsonl(path: str, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def _validate(model: nn.Module, val_set, cfg: TrainConfig, step: int, log: Callable[[str], None]) -> float:
    result = evaluate(model, val_set, max_images=cfg.val_data.get("max_images"))
    levels = result.levels()
    psnr_value, ssim_value = result.mean(levels[0] if levels else None)
    where = f" (reference level {levels[0]})" if levels else ""
    log(f"[{step}/{cfg.updates}] validation{where}: PSNR {psnr_value:.3f} dB, SSIM {ssim_value:.4f}")
    _append_jsonl(
        os.path.join(cfg.out_dir, "log.jsonl"),
        {"update": step, "val_psnr": psnr_value, "val_ssim": ssim_value},
    )
    return psnr_value


def _save_checkpoint(cfg, pg, step, net, disc, opt_g, opt_d, sched_g, sched_d) -> None:
    net, disc = _unwrap(net), _unwrap(disc)
    state = {
        "step": step,
        "world_size": pg.world,
        "config": cfg.to_dict(),
        "net": net.state_dict(),
        "opt_g": opt_g.state_dict(),
        "sched_g": sched_g.state_dict(),
        "rng": _rng_state(),
    }
    if disc is not None:
        state.update(disc=disc.state_dict(), opt_d=opt_d.state_dict(), sched_d=sched_d.state_dict())
    atomic_write(os.path.join(cfg.out_dir, CHECKPOINT_NAME), lambda p: torch.save(state, p))
    # the network alone, in the official layout (a plain state dict, like restoration_mse.pth)
    atomic_write(os.path.join(cfg.out_dir, WEIGHTS_NAME), lambda p: torch.save(net.state_dict(), p))


def _load_checkpoint(path, cfg, pg, net, disc, opt_g, opt_d, sched_g, sched_d) -> int:
    from amsa.checkpoints import load_weights

    if not os.path.isfile(path):
        raise FileNotFoundError(f"train: checkpoint {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "step" not in state or "opt_g" not in state:
        raise ValueError(
            f"train: {path!r} is not a training checkpoint (use model.weights to start from weights)"
        )
    saved = state["config"]
    diffs = [
        k
        for k in _RESUME_KEYS
        if json.dumps(saved.get(k), sort_keys=True) != json.dumps(getattr(cfg, k), sort_keys=True)
    ]
    if diffs:
        raise ValueError(f"train: cannot resume {path!r}: the config differs in {diffs}")
    if state["world_size"] != pg.world:
        raise ValueError(
            f"train: {path!r} was written by {state['world_size']} process(es), this run has {pg.world}"
        )
    if (disc is None) != ("disc" not in state):
        raise ValueError(f"train: {path!r} and this config disagree on the adversarial loss")
    net, disc = _unwrap(net), _unwrap(disc)
    load_weights(net, state["net"], what=f"restoration network of {path!r}")
    opt_g.load_state_dict(state["opt_g"])
    sched_g.load_state_dict(state["sched_g"])
    if disc is not None:
        load_weights(disc, state["disc"], what=f"critic of {path!r}")
        opt_d.load_state_dict(state["opt_d"])
        sched_d.load_state_dict(state["sched_d"])
    _set_rng_state(state["rng"])
    return int(state["step"])


def main_train(config: str, *, resume: str | None = None, out_dir: str | None = None) -> int:
    """``python -m amsa train``: load the config, train, report where the results are."""
    cfg = load_config(config, out_dir=out_dir)
    if resume == "auto":
        candidate = os.path.join(cfg.out_dir, CHECKPOINT_NAME)
        resume = candidate if os.path.isfile(candidate) else None
    state = train(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: {state.step} updates; weights in {os.path.join(cfg.out_dir, WEIGHTS_NAME)}",
            file=sys.stderr,
        )
    return 0
