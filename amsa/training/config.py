"""The training run's configuration (a JSON file, ``configs/``), its datasets and parameter groups."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field

import torch
from torch import nn

from amsa.io import read_json
from amsa.training.data import CUFED5TestSet, CUFEDTrainSet, SelfReferenceSet

__all__ = ["TrainConfig", "build_dataset", "check_run", "load_config", "param_groups"]


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
        check_run(self, "TrainConfig")
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str, cls: type = None, *, what: str = "train", **overrides: object):
    """Read a JSON config into ``cls`` (default :class:`TrainConfig`); ``overrides`` (e.g. ``out_dir``)
    replace its keys. Unknown keys are errors."""
    cls = TrainConfig if cls is None else cls
    raw = read_json(path, f"{what}: config file")
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: config file {path!r} must hold a JSON object, got {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown} in {path!r}; valid keys: {sorted(fields)}")
    missing = sorted(name for name, f in fields.items() if name not in raw
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{what}: {path!r} needs the keys {missing}")
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if not _has_type(value, hints[key]):
            raise ValueError(f"{what}: {key} in {path!r} must be {_type_name(hints[key])}, got {value!r}")
    return cls(**raw)


def _has_type(value: object, hint: object) -> bool:
    """Whether a JSON value fits a config field's annotation (an int is a float; a list is a tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        elems = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return len(elems) == len(value) and all(_has_type(v, a) for v, a in zip(value, elems))
    return isinstance(value, origin or hint)


def _type_name(hint: object) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple:
        plural = {int: "integers", float: "numbers"}.get(args[0], "values")
        return f"a list of {plural}" if args[-1] is Ellipsis else f"a list of {len(args)} {plural}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a JSON object"}.get(origin or hint, str(hint))


def check_run(cfg, what: str) -> None:
    """The checks every run's config shares: positive ``updates``, ``batch_size``, ``grad_accum`` and a
    valid ``device``."""
    for name in ("updates", "batch_size", "grad_accum"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{what}: {name} must be a positive int, got {v!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{what}: device must be 'auto', 'cpu' or 'cuda', got {cfg.device!r}")


def build_dataset(spec: dict, *, train: bool) -> torch.utils.data.Dataset:
    """A dataset from a config entry ``{"kind": ..., <constructor arguments>}`` (``max_images`` ignored);
    unknown or missing constructor arguments are errors naming the entry."""
    entry = "train_data" if train else "val_data"
    if not isinstance(spec, dict):
        raise ValueError(f"train: {entry} must be a JSON object, got {spec!r}")
    args = {k: v for k, v in spec.items() if k not in ("kind", "max_images")}
    kind = spec.get("kind")
    if kind == "cufed" and train:
        return _construct(CUFEDTrainSet, args, entry, kind)
    if kind == "cufed5" and not train:
        return _construct(CUFED5TestSet, args, entry, kind)
    if kind == "self_reference":
        if not train:
            args.setdefault("augment_data", False)
        return _construct(SelfReferenceSet, args, entry, kind)
    valid = "'cufed', 'self_reference'" if train else "'cufed5', 'self_reference'"
    raise ValueError(f"train: data kind {kind!r} is not valid here; use one of {valid}")


def _construct(dataset_cls: type, args: dict, entry: str, kind: str) -> torch.utils.data.Dataset:
    params = inspect.signature(dataset_cls).parameters
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise ValueError(f"train: unknown {entry} keys {unknown} for kind {kind!r}; valid keys: "
                         f"{sorted(params)}")
    missing = sorted(n for n, p in params.items() if p.default is p.empty and n not in args)
    if missing:
        raise ValueError(f"train: {entry} of kind {kind!r} needs the keys {missing}")
    return dataset_cls(**args)


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
