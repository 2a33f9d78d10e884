"""The loop every trainer shares (restoration, :mod:`amsa.training.loop`; matching extractor,
:mod:`amsa.training.extractor`): one process per device under ``torchrun`` or alone, resumable data, one
*update* = ``grad_accum`` micro-batches (all but the last under DDP's ``no_sync``, so gradients are
all-reduced once) then one step of every optimiser, progress lines with ETA, validation and checkpoints
at their intervals, everything logged to ``out_dir/log.jsonl``.

A trainer subclasses :class:`BaseTrainer` and provides ``parts`` (:class:`amsa.training.state.Part`: module,
optimiser, schedule), ``wrappers`` (the DDP wrappers its micro-batches call), :meth:`micro_batch`,
:meth:`validate` and :meth:`train_mode`; :func:`launch` runs it inside a process group.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from amsa.io import append_jsonl, atomic_write, write_json
from amsa.training.data import TrainBatchSampler
from amsa.training.distributed import ProcessGroup, device_kind, no_sync, resolve_device
from amsa.training.state import CHECKPOINT_NAME, RESUME_KEYS, Part, load_checkpoint, save_checkpoint

__all__ = ["BaseTrainer", "adam", "fmt_terms", "launch", "main_run"]

T = TypeVar("T")


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 86400}d {s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fmt_terms(terms: dict) -> str:
    return " ".join(f"{k} {float(v.detach() if isinstance(v, torch.Tensor) else v):.4g}"
                    for k, v in terms.items())


def adam(module_or_groups, cfg, lr: float):
    """Adam with ``cfg.betas`` and its MultiStepLR over updates (``cfg.milestones``, ``cfg.lr_gamma``)."""
    opt = torch.optim.Adam(module_or_groups, lr=lr, betas=cfg.betas)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), cfg.lr_gamma)


class BaseTrainer:
    """One training run on this process (see the module docstring). ``cfg`` needs ``out_dir``,
    ``updates``, ``batch_size``, ``grad_accum``, ``seed``, ``num_workers``, ``device``, ``train_data``,
    ``val_data``, ``log_every``, ``val_every``, ``ckpt_every`` and ``to_dict()``."""

    weights_name = "weights.pth"
    resume_keys: tuple[str, ...] = RESUME_KEYS
    command = "train"  # names the run in its errors

    def __init__(self, cfg, pg: ProcessGroup, log: Callable[[str], None]):
        """The process's device, then the global torch generator seeded with ``cfg.seed`` (a subclass
        builds its modules after this, so their initialisation follows the seed)."""
        self.cfg, self.pg, self.log = cfg, pg, log
        self.device = resolve_device(cfg.device, pg.local_rank)
        self.parts: list[Part] = []
        self.wrappers: list[nn.Module] = []
        self.step = 0
        torch.manual_seed(cfg.seed)

    # -- set-up -----------------------------------------------------------------------------------------
    def resume(self, path: str) -> None:
        """Restore the checkpoint at ``path``; on the main process drop the lines of ``log.jsonl`` written
        after it (updates past its step), which the resumed run writes again."""
        self.step = load_checkpoint(path, self.cfg.to_dict(), self.pg.world, self.parts, self.resume_keys)
        if self.pg.main:
            _truncate_log(os.path.join(self.cfg.out_dir, "log.jsonl"), self.step)
            self.log(f"resumed from {path} at update {self.step}")

    def start_data(self, dataset: Dataset) -> None:
        """The resumable loader of ``dataset`` (:class:`TrainBatchSampler` from this update on) as
        ``self.batches``; on the main process ``out_dir`` and its ``config.json``."""
        cfg, pg = self.cfg, self.pg
        sampler = TrainBatchSampler(len(dataset), cfg.batch_size, rank=pg.rank, world_size=pg.world,
                                    seed=cfg.seed, start=self.step * cfg.grad_accum)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                            pin_memory=self.device.type == "cuda")
        self.batches = iter(loader)
        if pg.main:
            os.makedirs(cfg.out_dir, exist_ok=True)
            write_json(os.path.join(cfg.out_dir, "config.json"), cfg.to_dict())

    # -- what a subclass provides -----------------------------------------------------------------------
    def micro_batch(self, micro: int) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch (losses divided by ``grad_accum``); the loss terms."""
        raise NotImplementedError

    def validate(self) -> None:
        raise NotImplementedError

    def train_mode(self) -> None:
        """Put the trained modules in training mode (frozen ones stay in eval mode)."""
        raise NotImplementedError

    def check_finite(self, loss: torch.Tensor, terms: dict) -> None:
        """Stop the run on a non-finite loss, with the loss terms."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{self.command}: non-finite loss at update {self.step}: {fmt_terms(terms)}")

    # -- the loop ---------------------------------------------------------------------------------------
    def update(self) -> dict[str, float]:
        """One update: ``grad_accum`` micro-batches (all but the last under ``no_sync``, so the last one's
        backward all-reduces), then one step of every optimiser. Returns the mean loss terms."""
        sums: dict[str, float] = {}
        for micro in range(self.cfg.grad_accum):
            with ExitStack() as stack:
                if micro < self.cfg.grad_accum - 1:
                    for w in self.wrappers:
                        stack.enter_context(no_sync(w))
                terms = self.micro_batch(micro)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / self.cfg.grad_accum
        for part in reversed(self.parts):  # the last part first (the critic), as its gradients were
            for p in part.module.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
            part.optimizer.step()
            part.optimizer.zero_grad(set_to_none=True)
            part.scheduler.step()
            # BN running statistics (the critic's) differ per process; keep the replicas identical
            self.pg.average_([b for b in part.module.buffers() if b.is_floating_point()])
        self.step += 1
        return sums

    def log_progress(self, sums: dict[str, float], rate: float) -> None:
        cfg = self.cfg
        line = {"update": self.step, **sums, "lr": self.parts[0].scheduler.get_last_lr()[0]}
        append_jsonl(os.path.join(cfg.out_dir, "log.jsonl"), line)
        eta = (cfg.updates - self.step) / rate if rate > 0 else float("inf")
        self.log(f"[{self.step}/{cfg.updates}] {fmt_terms(sums)} | lr {line['lr']:.2e} | {rate:.2f} upd/s | "
                 f"ETA {fmt_eta(eta)}")

    def log_validation(self, values: dict[str, float], text: str, where: str = "") -> None:
        """A validation line (``validation<where>: <text>``) on the console, ``values`` in ``log.jsonl``."""
        self.log(f"[{self.step}/{self.cfg.updates}] validation{where}: {text}")
        append_jsonl(os.path.join(self.cfg.out_dir, "log.jsonl"), {"update": self.step, **values})

    def save(self) -> None:
        save_checkpoint(self.cfg.out_dir, self.cfg.to_dict(), self.pg.world, self.step, self.parts,
                        self.weights_name)

    def run(self, end: int) -> None:
        """Updates until ``end``, with progress, validation and checkpoints at their intervals."""
        cfg, pg = self.cfg, self.pg
        self.train_mode()
        t0, step0 = time.time(), self.step
        while self.step < end:
            sums = self.update()
            last = self.step == end
            if pg.main and cfg.log_every and (self.step % cfg.log_every == 0 or last):
                self.log_progress(sums, (self.step - step0) / max(time.time() - t0, 1e-9))
            # the checkpoint first, so a validation that fails loses no update; validation runs on a forked
            # torch RNG, so the states the checkpoint took before it continue the run exactly
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                if pg.main:
                    self.save()
                pg.barrier()
            if cfg.val_data and cfg.val_every and (self.step % cfg.val_every == 0 or last):
                if pg.main:
                    devices = [self.device.index] if self.device.type == "cuda" else []
                    with torch.random.fork_rng(devices=devices):
                        self.validate()
                pg.barrier()


def launch(cfg, make_trainer: Callable[[ProcessGroup], BaseTrainer], result: Callable[[BaseTrainer], T], *,
           resume: str | None, stop_after: int | None) -> T:
    """Build the trainer in this process's group, resume it if asked, prepare it (``prepare()``), run it
    to ``cfg.updates`` (or ``stop_after``) and return ``result(trainer)``."""
    pg = ProcessGroup(device_kind(cfg.device))
    try:
        end = cfg.updates if stop_after is None else min(cfg.updates, stop_after)
        return _run(make_trainer(pg), resume, end, result)
    finally:
        pg.close()


def main_run(cfg, train: Callable[..., object], weights_name: str, resume: str | None) -> int:
    """The command-line run of a trainer: ``resume="auto"`` continues from ``out_dir/checkpoint.pt`` if
    it exists (else starts afresh); ``train(cfg, resume=...)`` returns a state with ``step``; the main
    process reports where the weights are."""
    if resume == "auto":
        candidate = os.path.join(cfg.out_dir, CHECKPOINT_NAME)
        resume = candidate if os.path.isfile(candidate) else None
    state = train(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {state.step} updates; weights in {os.path.join(cfg.out_dir, weights_name)}",
              file=sys.stderr)
    return 0


def _truncate_log(path: str, step: int) -> None:
    """Drop the lines of a ``log.jsonl`` past update ``step`` (and any torn line), atomically."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # cut short by the interruption
            continue
        if isinstance(entry, dict) and isinstance(entry.get("update"), int) and entry["update"] > step:
            continue
        kept.append(line)
    if kept != lines:
        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write("".join(line + "\n" for line in kept))

        atomic_write(path, write)


def _run(trainer: BaseTrainer, resume: str | None, end: int, result: Callable[[BaseTrainer], T]) -> T:
    # The trainer (and its DDP wrappers) is released when this returns, before the process group is
    # destroyed: a DDP reducer outliving its group aborts the process at exit.
    if resume is not None:
        trainer.resume(resume)
    trainer.prepare()
    trainer.run(end)
    return result(trainer)
