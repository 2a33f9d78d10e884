"""Training AMSA (paper section 3.3 and 4.2): ``python -m amsa train --config FILE``.

One process per device. On one device run it directly (no process group, no wrapper); on several GPUs
launch it with ``torchrun --nproc_per_node=N -m amsa train --config FILE``: each process takes
``batch_size`` samples per micro-batch and the trained modules are wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` (DDP; NCCL on GPUs, gloo on CPU;
:mod:`amsa.training.distributed`). The first ``grad_accum - 1`` micro-batches of an update run under
``no_sync()``, so gradients accumulate locally and DDP all-reduces them once per update, bucket by bucket
while the last micro-batch's backward is still running; every replica then takes the same optimiser step.
The gradient is the mean over processes of each process's ``sum over micro-batches of loss / grad_accum``
(global batch ``N x batch_size x grad_accum``). DDP wraps:

* the generator: the whole model goes through DDP (its forward must, for DDP's bookkeeping) but DDP
  ignores every parameter and buffer outside ``model.net``, so only the restoration network is broadcast
  at start and reduced; the frozen extractors are left alone;
* the critic, WGAN-GP included: the penalty takes ``autograd.grad`` w.r.t. the critic's *input* (not its
  parameters, which DDP does not support) and the following ``backward`` of ``critic + gp_weight * GP``
  reaches every critic parameter once, so DDP's hooks see ordinary ``.grad`` accumulation (the gradients
  equal a hand all-reduce of the local ones). The generator's adversarial term calls the bare critic
  (frozen), outside DDP.

One *update* = ``grad_accum`` micro-batches on every process, then one step of each optimiser:

* critic (if ``w_adv > 0``): ``D(SR) - D(HR) + gp_weight * GP`` (WGAN-GP), Adam;
* generator (the restoration network ``model.net``, the only trained part of :class:`amsa.AMSA`):
  ``w_rec * L1 + w_per * ||VGG19_relu5_1(SR) - VGG19_relu5_1(HR)||_F - w_adv * D(SR)``, Adam with the
  official per-parameter learning rates (offset convs of the 1x scale ``lr_offset_1x``, 2x ``lr_offset_2x``),
  MultiStepLR over updates for both.

All randomness is explicit (data order and augmentation from :class:`amsa.training.data.TrainBatchSampler`,
the gradient penalty's mixing weights from a generator seeded by the update and micro-batch), and a
checkpoint (:mod:`amsa.training.state`) holds model, critic, optimisers, schedulers, RNG states and the
update counter, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from amsa.evaluation.evaluate import evaluate
from amsa.models import AMSA, VGGFeatures
from amsa.training.base import BaseTrainer, adam, launch, main_run
from amsa.training.config import TrainConfig, build_dataset, load_config, param_groups
from amsa.training.distributed import ProcessGroup
from amsa.training.losses import (
    ImageDiscriminator,
    PerceptualLoss,
    gradient_penalty,
    reconstruction_loss,
    wgan_critic_loss,
    wgan_generator_loss,
)
from amsa.training.state import Part

__all__ = ["TrainState", "Trainer", "main_train", "train"]

WEIGHTS_NAME = "restoration.pth"


@dataclass
class TrainState:
    """What :func:`train` returns: the trained model and critic and the update count reached."""

    model: nn.Module
    disc: nn.Module | None
    step: int


class Trainer(BaseTrainer):
    """One restoration training run on this process: the modules, their optimisers, the data, and the
    micro-batch of the loop (:class:`amsa.training.base.BaseTrainer` drives it)."""

    weights_name = WEIGHTS_NAME

    def __init__(self, cfg: TrainConfig, pg: ProcessGroup, model_factory: Callable[[dict], nn.Module],
                 log: Callable[[str], None]):
        super().__init__(cfg, pg, log)  # seeds the global generator
        self.model = model_factory(dict(cfg.model)).to(self.device)
        self.net = getattr(self.model, "net", None)
        if not isinstance(self.net, nn.Module):
            raise TypeError(f"train: the model ({type(self.model).__name__}) must hold its trained network "
                            "as .net")
        self.disc = ImageDiscriminator(ndf=cfg.disc_ndf).to(self.device) if cfg.w_adv > 0 else None
        self.perceptual = None
        if cfg.w_per > 0:
            vgg = VGGFeatures("vgg19", ("relu5_1",), weights=cfg.perceptual_vgg_weights)
            self.perceptual = PerceptualLoss(vgg).to(self.device)
        self.parts = [Part("net", "g", self.net, *adam(param_groups(self.net, cfg), cfg, cfg.lr))]
        if self.disc is not None:
            self.parts.append(Part("disc", "d", self.disc, *adam(self.disc.parameters(), cfg, cfg.lr_d)))

    def prepare(self) -> None:
        """Identical replicas, the DDP wrappers the loop calls (the bare modules with one process;
        checkpoints always use the bare modules), the data loader and the validation set."""
        cfg, pg = self.cfg, self.pg
        for part in self.parts:  # DDP broadcasts rank 0's parameters when it wraps; buffers here
            pg.broadcast_buffers_(part.module)
        self.g_model = pg.wrap(self.model, self.device, only=self.net)
        self.d_model = pg.wrap(self.disc, self.device) if self.disc is not None else None
        self.wrappers = [w for w in (self.d_model, self.g_model) if w is not None]
        dataset = build_dataset(cfg.train_data, train=True)
        self.start_data(dataset)
        self.val_set = build_dataset(cfg.val_data, train=False) if cfg.val_data and pg.main else None
        if pg.main:
            n_train = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
            self.log(
                f"training {type(self.model).__name__}: {n_train:,} trained parameters, {len(dataset)} "
                f"training items, {pg.world} process(es) x {cfg.batch_size} x {cfg.grad_accum} accumulation "
                f"= {pg.world * cfg.batch_size * cfg.grad_accum} samples per update, device {self.device}"
            )

    def train_mode(self) -> None:
        self.model.train()
        if self.disc is not None:
            self.disc.train()

    def micro_batch(self, micro: int) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch (critic first, then the generator against the frozen
        critic); returns the loss terms."""
        cfg, device = self.cfg, self.device
        batch = next(self.batches)
        lr_img, ref, hr = (batch[k].to(device, non_blocking=True) for k in ("lr", "ref", "hr"))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            sr = self.g_model(lr_img, ref)
        sr = sr.float()
        terms: dict[str, torch.Tensor] = {}
        if self.disc is not None:
            g = torch.Generator().manual_seed(
                cfg.seed * 2**32 + (self.step * cfg.grad_accum + micro) * self.pg.world + self.pg.rank)
            alpha = torch.rand(hr.shape[0], generator=g).to(device)
            l_critic = wgan_critic_loss(self.d_model(hr), self.d_model(sr.detach()))
            l_gp = gradient_penalty(self.d_model, hr, sr, alpha)
            ((l_critic + cfg.gp_weight * l_gp) / cfg.grad_accum).backward()
            terms["critic"], terms["gp"] = l_critic.detach(), l_gp.detach()
            self.disc.requires_grad_(False)
        loss = torch.zeros((), device=device)
        if cfg.w_rec > 0:
            terms["rec"] = reconstruction_loss(sr, hr)
            loss = loss + cfg.w_rec * terms["rec"]
        if self.perceptual is not None:
            terms["per"] = self.perceptual(sr, hr)
            loss = loss + cfg.w_per * terms["per"]
        if self.disc is not None:
            terms["adv"] = wgan_generator_loss(self.disc(sr))  # the bare critic: frozen, nothing reduced
            loss = loss + cfg.w_adv * terms["adv"]
        (loss / cfg.grad_accum).backward()
        if self.disc is not None:
            self.disc.requires_grad_(True)
        self.check_finite(loss, terms)
        return terms

    def validate(self) -> None:
        cfg = self.cfg
        result = evaluate(self.model, self.val_set, max_images=cfg.val_data.get("max_images"))
        levels = result.levels()
        psnr_value, ssim_value = result.mean(levels[0] if levels else None)
        where = f" (reference level {levels[0]})" if levels else ""
        self.log_validation({"val_psnr": psnr_value, "val_ssim": ssim_value},
                            f"PSNR {psnr_value:.3f} dB, SSIM {ssim_value:.4f}", where)


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
            accumulation, seed, loss weights and optimiser settings (:data:`amsa.training.state.RESUME_KEYS`),
            and it must come from the same number of processes).
        stop_after: stop (with a checkpoint) once this many updates are done, as an interruption would;
            the learning-rate schedule still follows ``cfg.updates``.
        model_factory: builds the model from ``cfg.model`` (default :class:`amsa.AMSA`); the model must
            map ``(lr [B,3,h,w], ref [B,3,H,W])`` to ``[B,3,4h,4w]`` and hold its trained part as ``.net``.
        log: where progress lines go on the main process (default: print).
    """
    factory = model_factory or (lambda kwargs: AMSA(**kwargs))
    return launch(cfg, lambda pg: Trainer(cfg, pg, factory, log or print),
                  lambda t: TrainState(model=t.model, disc=t.disc, step=t.step),
                  resume=resume, stop_after=stop_after)


def main_train(config: str, *, resume: str | None = None, out_dir: str | None = None) -> int:
    """``python -m amsa train``: load the config, train, report where the results are."""
    return main_run(load_config(config, out_dir=out_dir), train, WEIGHTS_NAME, resume)
