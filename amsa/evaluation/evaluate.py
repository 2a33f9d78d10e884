"""Evaluation and inference: PSNR/SSIM of a RefSR model on a test set, and super-resolving one image.

The protocol (:mod:`amsa.evaluation.metrics`): the SR output is rounded to 8-bit levels, PSNR and SSIM
are taken on the MATLAB Y channel with ``crop_border = 4``. On CUFED5 every HR image is super-resolved once
per reference level (the reference ``NNN_k.png`` alone), giving the per-level table of the paper (Table 3);
the headline CUFED5 number is level 1. Files are written atomically (:func:`amsa.io.atomic_write`), so an
interrupted run never leaves a half-written image or table.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from amsa.evaluation.metrics import psnr, quantize_8bit, ssim
from amsa.io import atomic_write, read_json, save_image
from amsa.models import AMSA
from amsa.models.extractors import LEARNED, LEARNED_FEATURE_WEIGHTS

__all__ = ["EvalResult", "EvalRow", "evaluate", "load_model", "super_resolve"]


@torch.no_grad()
def super_resolve(
    model: nn.Module, lr: torch.Tensor, refs: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """``model(lr, refs)`` in eval mode without gradients; ``lr`` ``[B, 3, h, w]`` and references in
    ``[0, 1]`` are moved to the model's device. Returns the SR output ``[B, 3, 4h, 4w]`` clipped to
    ``[0, 1]``, on the CPU, float32."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        refs_dev = refs.to(device) if isinstance(refs, torch.Tensor) else [r.to(device) for r in refs]
        sr = model(lr.to(device), refs_dev)
    finally:
        model.train(was_training)
    return sr.float().clamp(0.0, 1.0).cpu()


@dataclass(frozen=True)
class EvalRow:
    """One SR result: image name, reference level (``None`` outside CUFED5), PSNR (dB) and SSIM."""

    name: str
    level: int | None
    psnr: float
    ssim: float


@dataclass
class EvalResult:
    """Per-image rows and their means (overall and per reference level)."""

    rows: list[EvalRow] = field(default_factory=list)

    def mean(self, level: int | None = None) -> tuple[float, float]:
        """Mean ``(PSNR, SSIM)`` over the rows of ``level`` (all rows when the set has no levels). An
        infinite PSNR (an exact reconstruction) makes the mean infinite."""
        rows = [r for r in self.rows if r.level == level] if self.levels() else self.rows
        if not rows:
            raise ValueError(f"EvalResult.mean: no rows for level {level}")
        return sum(r.psnr for r in rows) / len(rows), sum(r.ssim for r in rows) / len(rows)

    def levels(self) -> list[int]:
        return sorted({r.level for r in self.rows if r.level is not None})

    def table(self) -> str:
        """Human-readable summary: one line per level (or one overall line)."""
        lines = [f"{'level':>6} {'images':>7} {'PSNR':>8} {'SSIM':>7}"]
        for level in self.levels() or [None]:
            p, s = self.mean(level)
            n = sum(1 for r in self.rows if r.level == level) if level is not None else len(self.rows)
            lines.append(f"{'all' if level is None else f'L{level}':>6} {n:>7} {p:>8.3f} {s:>7.4f}")
        return "\n".join(lines)

    def write_csv(self, path: str | os.PathLike) -> None:
        """Per-image rows then one ``mean`` row per level, atomically."""

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["name", "level", "psnr", "ssim"])
                for r in self.rows:
                    w.writerow([r.name, "" if r.level is None else r.level, f"{r.psnr:.4f}", f"{r.ssim:.6f}"])
                for level in self.levels() or [None]:
                    p, s = self.mean(level)
                    w.writerow(["mean", "" if level is None else level, f"{p:.4f}", f"{s:.6f}"])

        atomic_write(path, write)


def _cases(sample: dict) -> Iterable[tuple[int | None, torch.Tensor]]:
    if "refs" in sample:
        yield from sample["refs"].items()
    else:
        yield None, sample["ref"]


def evaluate(
    model: nn.Module,
    dataset: Sequence[dict],
    *,
    crop_border: int = 4,
    max_images: int | None = None,
    save_dir: str | None = None,
    progress: Callable[[EvalRow], None] | None = None,
) -> EvalResult:
    """PSNR and SSIM (Y channel, ``crop_border``) of ``model`` on ``dataset`` (items with ``hr``, ``lr``
    and ``ref`` or ``refs``: :mod:`amsa.training.data`), one image at a time.

    ``max_images`` limits the number of HR images; ``save_dir`` receives ``NAME.png`` (``NAME_Lk.png`` per
    level on CUFED5); ``progress`` is called with each row.
    """
    result = EvalResult()
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    for i in range(n):
        sample = dataset[i]
        hr = sample["hr"].unsqueeze(0)
        for level, ref in _cases(sample):
            sr = super_resolve(model, sample["lr"].unsqueeze(0), ref.unsqueeze(0))
            if sr.shape != hr.shape:
                raise ValueError(
                    f"evaluate: {sample['name']}: the model returned {list(sr.shape)} for HR {list(hr.shape)}"
                )
            sr = quantize_8bit(sr)
            row = EvalRow(
                sample["name"],
                level,
                float(psnr(sr, hr, crop_border=crop_border)),
                float(ssim(sr, hr, crop_border=crop_border)),
            )
            result.rows.append(row)
            if save_dir is not None:
                stem = sample["name"] if level is None else f"{sample['name']}_L{level}"
                atomic_write(os.path.join(save_dir, f"{stem}.png"), lambda p, img=sr: save_image(img, p))
            if progress is not None:
                progress(row)
    return result


def _model_kwargs(weights: str, model_config: str | None) -> tuple[dict, int]:
    """AMSA keyword arguments and the run's seed: from ``model_config`` (a training ``config.json`` with a
    ``model`` entry, or a JSON object of AMSA arguments), else from the ``config.json`` a training run wrote
    next to ``weights``, else the defaults (the official model size) and seed 0."""
    path = model_config
    if path is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(weights)), "config.json")
        path = beside if os.path.isfile(beside) else None
    if path is None:
        return {}, 0
    raw = read_json(path, "model config")
    kwargs = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(kwargs, dict):
        raise ValueError(f"model config {path!r}: expected a JSON object of AMSA arguments")
    seed = raw.get("seed", 0) if "model" in raw else 0
    return dict(kwargs), int(seed)


def load_model(
    weights: str,
    *,
    model_config: str | None = None,
    feature_weights: str | None = None,
    vgg_weights: str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """An :class:`amsa.AMSA` in eval mode with the restoration weights ``weights`` (a training run's
    ``restoration.pth`` or ``checkpoint.pt``, or an official ``restoration*.pth``).

    The architecture comes from ``model_config`` or the run's ``config.json`` beside ``weights`` (see
    :func:`_model_kwargs`); ``feature_weights`` / ``vgg_weights`` override the matching extractor's and
    VGG19's weights given there. Without any config (official weights) the matching extractor is the one
    shipped with the package (``"@learned"``); a run's config without one keeps the random extractor the
    run trained with. Raises ``FileNotFoundError`` for missing files and
    :class:`amsa.CheckpointError` (a ``ValueError``) when the weights do not fit the model.
    """
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file {weights!r} does not exist")
    kwargs, seed = _model_kwargs(weights, model_config)
    if not kwargs:  # no training config: official / third-party weights; match with the shipped extractor
        kwargs["feature_weights"] = LEARNED
    kwargs["weights"] = weights
    for key, value in (("feature_weights", feature_weights), ("vgg_weights", vgg_weights)):
        if value is not None:
            kwargs[key] = value
    for key in ("feature_weights", "vgg_weights"):
        path = LEARNED_FEATURE_WEIGHTS if kwargs.get(key) == LEARNED else kwargs.get(key)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{key} file {path!r} does not exist")
    # Parts without weights (extractors of a smoke run) are random: seed them as training did
    # (torch.manual_seed(cfg.seed) right before building the model), so they are the ones it trained with.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = AMSA(**kwargs)
        except TypeError as exc:
            raise ValueError(f"model config: {exc}") from exc
    return model.to(device).eval()
