"""Training the matching extractor (paper section 3: "pretrained with contrastive learning and knowledge
distillation as C2-Matching did"): ``python -m amsa train-extractor --config FILE``.

The network is :class:`amsa.models.ContrasExtractorSep` (VGG16 to conv3_1, an LR branch and a reference
branch; the output loads into ``amsa.AMSA(feature_weights=...)`` strictly). Two stages, as the official
release runs them (:mod:`amsa.training.contrastive` has the losses):

1. **teacher** (``configs/extractor_teacher.json``): the sharp image and its homography warp, the
   hardest-negative margin loss on the true correspondences;
2. **student** (``configs/extractor_student.json``): the LR branch sees the 4x LR-up image instead, with
   the same loss plus ``distill_weight`` x the KL divergence from the frozen teacher's correlation
   (teacher on the sharp image, both on the same reference).

Everything else is the restoration trainer's loop (:class:`amsa.training.base.BaseTrainer`): one device
or ``torchrun`` + DDP, gradient accumulation, exact resume from ``checkpoint.pt``, progress lines and
``log.jsonl``, atomic outputs. Validation: the % of LR-up cells of held-out pairs whose exact and
CFE-PatchMatch matches lie within 2 cells of the truth (:mod:`amsa.training.correspondence`); the fixed
filter bank's figure on the same pairs is logged once at the start for comparison.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from amsa.models import ContrasExtractorSep
from amsa.models.matching_features import MatchingFeatures
from amsa.training.base import BaseTrainer, adam, launch, main_run
from amsa.training.config import load_config
from amsa.training.contrastive import pair_losses
from amsa.training.correspondence import correspondence_accuracy, homography_pairs
from amsa.training.distributed import ProcessGroup
from amsa.training.extractor_config import (
    EXTRACTOR_RESUME_KEYS,
    ExtractorConfig,
    build_pair_dataset,
    pair_paths,
    validation_geometry,
)
from amsa.training.pairs import feature_correspondences
from amsa.training.state import Part

__all__ = ["WEIGHTS_NAME", "ExtractorState", "ExtractorTrainer", "main_train_extractor", "train_extractor"]

WEIGHTS_NAME = "feature_extraction.pth"


def new_extractor(weights: str | None) -> ContrasExtractorSep:
    """A trainable extractor from ``weights`` or, without, a random start in which both branches are the
    same (as the official start from ImageNet VGG16 makes them): Kaiming-normal convolutions (fan-in,
    ReLU gain) with zero biases, drawn from the global generator. Two independent random branches would
    start from unrelated features (matching them finds nothing) and the contrastive loss then collapses
    every descriptor onto one (loss = margin)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ContrasExtractorSep: no weights given")
        net = ContrasExtractorSep(weights=weights, requires_grad=True)
    if weights is None:
        with torch.no_grad():
            for conv in net.feature_extraction_image1.model:
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                    nn.init.zeros_(conv.bias)
            net.feature_extraction_image2.load_state_dict(net.feature_extraction_image1.state_dict())
    return net


class ExtractorTrainer(BaseTrainer):
    """One matching-extractor run on this process (see the module docstring)."""

    weights_name = WEIGHTS_NAME
    resume_keys = EXTRACTOR_RESUME_KEYS
    command = "train-extractor"

    def __init__(self, cfg: ExtractorConfig, pg: ProcessGroup, log: Callable[[str], None]):
        super().__init__(cfg, pg, log)  # seeds the global generator
        self.net = new_extractor(cfg.init_weights).to(self.device)
        self.teacher = None
        if cfg.stage == "student":
            self.teacher = ContrasExtractorSep(weights=cfg.teacher_weights).to(self.device).eval()
        self.parts = [Part("net", "g", self.net, *adam(self.net.parameters(), cfg, cfg.lr))]
        self.last_val: dict[str, float] | None = None

    def prepare(self) -> None:
        cfg, pg = self.cfg, self.pg
        pg.broadcast_buffers_(self.net)
        self.model = pg.wrap(self.net, self.device)
        self.wrappers = [self.model]
        dataset = build_pair_dataset(cfg.train_data)
        self.start_data(dataset)
        self.val_pairs = None
        if pg.main:
            n = sum(p.numel() for p in self.net.parameters())
            self.log(f"training the matching extractor, stage {cfg.stage}: {n:,} parameters, {len(dataset)} "
                     f"images, {pg.world} process(es) x {cfg.batch_size} x {cfg.grad_accum} accumulation, "
                     f"{cfg.train_data.get('gt_size', 160)} px pairs, device {self.device}")
            if cfg.val_data:
                geo = validation_geometry(cfg.val_data)
                self.val_pairs = homography_pairs(pair_paths(cfg.val_data), **geo)
                base = correspondence_accuracy(MatchingFeatures.filter_bank(), self.val_pairs)
                self.log(f"validation: {len(self.val_pairs)} held-out pairs, {base.cells} cells; the filter "
                         f"bank matches {base.exact:.1f} % (exact) / {base.cfe:.1f} % (CFE) within 2 cells")

    def train_mode(self) -> None:
        self.net.train()

    def micro_batch(self, micro: int) -> dict[str, torch.Tensor]:
        """The mean over the batch's pairs (those with at least ``min_correspondences``) of the contrastive
        loss, plus ``distill_weight`` x distillation in stage 2 and ``nce_weight`` x InfoNCE."""
        cfg, device = self.cfg, self.device
        batch = next(self.batches)
        img_ref = batch["img_ref"].to(device, non_blocking=True)
        side = "img_in_up" if self.teacher is not None else "img_in"
        student_in = batch[side].to(device, non_blocking=True)
        f1, f2 = self.model(student_in, img_ref)
        t1 = t2 = None
        if self.teacher is not None:
            with torch.no_grad():
                t1, t2 = self.teacher(batch["img_in"].to(device, non_blocking=True), img_ref)
        sums: dict[str, torch.Tensor] = {}
        used = 0
        for b in range(f1.shape[0]):
            idx1, pos2 = feature_correspondences(batch["homography"][b], tuple(f1.shape[-2:]),
                                                 tuple(f2.shape[-2:]), border=cfg.border)
            if idx1.numel() < cfg.min_correspondences:
                continue
            idx1, pos2 = idx1.to(device), pos2.to(device)
            teacher = None if t1 is None else (t1[b], t2[b])
            terms = pair_losses((f1[b], f2[b]), idx1, pos2, margin=cfg.margin, safe_radius=cfg.safe_radius,
                                teacher=teacher, temperature=cfg.temperature, nce=cfg.nce_weight > 0)
            loss = terms.contrastive
            if terms.distill is not None:
                loss = loss + cfg.distill_weight * terms.distill
            if terms.nce is not None:
                loss = loss + cfg.nce_weight * terms.nce
            for key, v in (("loss", loss), ("contrastive", terms.contrastive), ("pos", terms.positive),
                           ("neg", terms.negative), ("distill", terms.distill), ("nce", terms.nce)):
                if v is not None:
                    sums[key] = sums.get(key, 0.0) + v
            used += 1
        if used == 0:
            raise ValueError(f"train-extractor: no pair of the batch at update {self.step} has "
                             f"{cfg.min_correspondences} correspondences (lower min_correspondences or the "
                             "geometry's shift)")
        terms = {k: v / used for k, v in sums.items()}
        (terms["loss"] / cfg.grad_accum).backward()
        self.check_finite(terms["loss"], terms)
        return {k: v.detach() for k, v in terms.items()}

    def validate(self) -> None:
        acc = correspondence_accuracy(MatchingFeatures.learned(self.net.eval()), self.val_pairs)
        self.train_mode()
        self.log_validation(acc.as_dict(), f"{acc.exact:.2f} % (exact) / {acc.cfe:.2f} % (CFE) of "
                            f"{acc.cells} cells within 2 cells of the truth")
        self.last_val = acc.as_dict()


@dataclass
class ExtractorState:
    """What :func:`train_extractor` returns: the trained extractor, the update count, the last validation."""

    net: nn.Module
    step: int
    last_val: dict[str, float] | None


def train_extractor(cfg: ExtractorConfig, *, resume: str | None = None, stop_after: int | None = None,
                    log: Callable[[str], None] | None = None) -> ExtractorState:
    """Run (or resume) a matching-extractor stage. ``resume`` and ``stop_after`` as for
    :func:`amsa.training.loop.train`."""
    return launch(cfg, lambda pg: ExtractorTrainer(cfg, pg, log or print),
                  lambda t: ExtractorState(t.net, t.step, t.last_val), resume=resume, stop_after=stop_after)


def main_train_extractor(config: str, *, resume: str | None = None, out_dir: str | None = None) -> int:
    """``python -m amsa train-extractor``: load the config, train, report where the weights are."""
    cfg = load_config(config, ExtractorConfig, what="train-extractor", out_dir=out_dir)
    return main_run(cfg, train_extractor, WEIGHTS_NAME, resume)
