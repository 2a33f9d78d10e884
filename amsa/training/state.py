"""What a training checkpoint holds, so that a resumed run equals an uninterrupted one bitwise: every
trained module with its optimiser and LR schedule (the bare modules' state dicts, official key names,
never DDP's ``module.`` ones), the global RNG states and the update counter."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from amsa.io import atomic_write
from amsa.models.checkpoints import load_weights
from amsa.training.distributed import unwrap

__all__ = ["CHECKPOINT_NAME", "RESUME_KEYS", "Part", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
# Config entries a resumed run must share with the checkpoint (they change what the run computes; the
# optimiser and schedule settings among them because their saved states override the config's on resume).
RESUME_KEYS = ("model", "train_data", "batch_size", "grad_accum", "seed", "w_rec", "w_per", "w_adv",
               "lr", "lr_offset_1x", "lr_offset_2x", "lr_d", "betas", "milestones", "lr_gamma", "amp",
               "gp_weight", "perceptual_vgg_weights", "disc_ndf")


@dataclass
class Part:
    """A trained module with its optimiser and schedule, stored under the checkpoint keys ``key``,
    ``opt_<tag>`` and ``sched_<tag>`` (the generator: ``net``/``g``; the critic: ``disc``/``d``)."""

    key: str
    tag: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def state(self) -> dict:
        return {self.key: unwrap(self.module).state_dict(), f"opt_{self.tag}": self.optimizer.state_dict(),
                f"sched_{self.tag}": self.scheduler.state_dict()}

    def load(self, state: dict, path: str) -> None:
        load_weights(unwrap(self.module), state[self.key], what=f"{self.key} of {path!r}")
        self.optimizer.load_state_dict(state[f"opt_{self.tag}"])
        self.scheduler.load_state_dict(state[f"sched_{self.tag}"])


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


def save_checkpoint(out_dir: str, config: dict, world: int, step: int, parts: list[Part],
                    weights_name: str) -> None:
    """``out_dir/checkpoint.pt`` (everything a resume needs) and ``out_dir/<weights_name>``: the first
    part's module alone, a plain state dict in the official layout (like ``restoration_mse.pth``)."""
    state = {"step": step, "world_size": world, "config": config, "rng": _rng_state()}
    for part in parts:
        state.update(part.state())
    atomic_write(os.path.join(out_dir, CHECKPOINT_NAME), lambda p: torch.save(state, p))
    weights = state[parts[0].key]
    atomic_write(os.path.join(out_dir, weights_name), lambda p: torch.save(weights, p))


def load_checkpoint(path: str, config: dict, world: int, parts: list[Part],
                    resume_keys: tuple[str, ...] = RESUME_KEYS) -> int:
    """Restore ``parts`` and the RNG states from a :func:`save_checkpoint` file; returns its update count.

    The checkpoint's config must equal ``config`` on ``resume_keys``, it must come from the same number of
    processes and hold these parts."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"train: checkpoint {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "step" not in state or "rng" not in state:
        raise ValueError(
            f"train: {path!r} is not a training checkpoint (use model.weights to start from weights)"
        )
    saved = state["config"]
    diffs = [k for k in resume_keys
             if json.dumps(saved.get(k), sort_keys=True) != json.dumps(config.get(k), sort_keys=True)]
    if diffs:
        raise ValueError(f"train: cannot resume {path!r}: the config differs in {diffs}")
    if state["world_size"] != world:
        raise ValueError(
            f"train: {path!r} was written by {state['world_size']} process(es), this run has {world}"
        )
    missing = [p.key for p in parts if p.key not in state]
    if missing:
        raise ValueError(f"train: {path!r} holds no {missing}: it was written by a different kind of run")
    for part in parts:
        part.load(state, path)
    _set_rng_state(state["rng"])
    return int(state["step"])
