"""The configuration of a matching-extractor run (``python -m amsa train-extractor --config FILE``) and its
data: CUFED's training layout or any folder of photos, as homography pairs (:mod:`amsa.training.pairs`).

Presets: ``configs/extractor_teacher.json`` and ``configs/extractor_student.json`` (the official stages
1 and 2 on CUFED), ``configs/extractor_small_*.json`` (the short CPU schedule on the photos shipped with
matplotlib and scikit-image that produced ``amsa/weights/feature_extraction_small.pth``), and
``configs/tiny_extractor.json`` (a seconds-long smoke run).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from amsa.training.config import check_run
from amsa.training.pairs import HomographyPairSet, photo_paths

__all__ = ["EXTRACTOR_RESUME_KEYS", "STAGES", "ExtractorConfig", "build_pair_dataset", "pair_paths",
           "validation_geometry"]

STAGES = ("teacher", "student")
# Entries a resumed run must share with its checkpoint (they change what the run computes; the optimiser
# and schedule settings among them because their saved states override the config's on resume).
EXTRACTOR_RESUME_KEYS = ("stage", "train_data", "batch_size", "grad_accum", "seed", "margin", "safe_radius",
                         "border", "min_correspondences", "distill_weight", "temperature", "nce_weight",
                         "teacher_weights", "init_weights", "lr", "betas", "milestones", "lr_gamma")
_GEOMETRY = ("corner_jitter", "scale", "max_rotation", "max_shift")


@dataclass
class ExtractorConfig:
    """A matching-extractor training run (JSON keys; unknown keys are errors). Defaults: the official stage 1.

    Attributes:
        out_dir: ``checkpoint.pt``, ``feature_extraction.pth`` (a :class:`amsa.models.ContrasExtractorSep`
            state dict, the official layout), ``log.jsonl``, ``config.json``.
        stage: ``"teacher"`` (stage 1: both branches on the sharp image and its warp, contrastive loss) or
            ``"student"`` (stage 2: the LR branch on LR-up, contrastive + ``distill_weight`` x distillation
            against the frozen ``teacher_weights``).
        train_data: ``{"kind": "cufed", "root": DIR}`` (``DIR/input/*``, resized to ``gt_size``) or
            ``{"kind": "photos", "folder": DIR | "@sample" | "@skimage", "files": [...]}`` (random crops),
            plus :class:`amsa.training.pairs.HomographyPairSet` arguments (``gt_size``, ``corner_jitter``,
            ``scale``, ``max_rotation``, ``max_shift``, ``flip``, ``rot90``).
        val_data: ``None`` or held-out pairs: the same keys plus ``per_image`` (pairs per image) and
            ``seed``; validation reports the % of cells matched within 2 cells of the truth
            (:mod:`amsa.training.correspondence`).
        teacher_weights: the stage-1 ``feature_extraction.pth`` (stage 2 only, required there).
        init_weights: weights to start from: a ``ContrasExtractorSep`` state dict or a torchvision VGG16
            (both branches; the official runs start from ImageNet VGG16); ``None``: PyTorch's default
            random initialisation.
        updates, batch_size, grad_accum: official 5,000 (stage 1) / 75,000 (stage 2), 8, 1.
        lr, betas, milestones, lr_gamma: Adam 1e-3, (0.9, 0.999); stage 2 decays x0.1 at 72,545.
        margin, safe_radius: of the contrastive loss (official 1.0 and 4 cells).
        border: correspondences count only at least this many pixels inside the reference (official 10).
        min_correspondences: a pair with fewer is skipped (official 128).
        distill_weight, temperature: of the distillation term (official 15 and 0.15).
        nce_weight: weight of the InfoNCE term (:func:`amsa.training.contrastive.info_nce_loss`, same
            temperature; not in the official recipe, 0): a random start needs it, the hinge alone collapses.
        seed, num_workers, device, log_every, val_every, ckpt_every: as for restoration training.
    """

    out_dir: str
    stage: str = "teacher"
    train_data: dict = field(default_factory=dict)
    val_data: dict | None = None
    teacher_weights: str | None = None
    init_weights: str | None = None
    updates: int = 5000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    margin: float = 1.0
    safe_radius: float = 4.0
    border: float = 10.0
    min_correspondences: int = 128
    distill_weight: float = 15.0
    temperature: float = 0.15
    nce_weight: float = 0.0
    seed: int = 10
    num_workers: int = 4
    device: str = "auto"
    log_every: int = 100
    val_every: int = 5000
    ckpt_every: int = 5000

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.milestones = tuple(self.milestones)
        check_run(self, "ExtractorConfig")
        if self.stage not in STAGES:
            raise ValueError(f"ExtractorConfig: stage must be one of {STAGES}, got {self.stage!r}")
        if self.stage == "student" and not self.teacher_weights:
            raise ValueError("ExtractorConfig: the student stage needs teacher_weights (the stage-1 "
                             "feature_extraction.pth)")
        for name in ("lr", "margin", "safe_radius", "border", "distill_weight", "nce_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"ExtractorConfig: {name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"ExtractorConfig: temperature must be > 0, got {self.temperature}")
        if self.train_data.get("kind") not in ("cufed", "photos"):
            raise ValueError("ExtractorConfig: train_data needs 'kind': 'cufed' or 'photos'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pair_paths(spec: dict) -> list[str]:
    """The image files of a data entry: ``cufed`` -> ``root/input/*``; ``photos`` -> ``folder``'s (or
    its ``files``)."""
    if spec.get("kind") == "cufed":
        return photo_paths(os.path.join(spec["root"], "input"), what="train-extractor: CUFED input")
    if spec.get("kind") == "photos":
        return photo_paths(spec["folder"], spec.get("files"), what="train-extractor: photos")
    raise ValueError(f"train-extractor: data kind {spec.get('kind')!r} is not 'cufed' or 'photos'")


def build_pair_dataset(spec: dict) -> HomographyPairSet:
    """The training pairs of a ``train_data`` entry (CUFED: whole images resized, official geometry)."""
    args = {k: v for k, v in spec.items() if k in (*_GEOMETRY, "gt_size", "flip", "rot90")}
    unknown = sorted(set(spec) - set(args) - {"kind", "root", "folder", "files", "per_image", "seed"})
    if unknown:
        raise ValueError(f"train-extractor: unknown data keys {unknown}")
    return HomographyPairSet(pair_paths(spec), crop="resize" if spec["kind"] == "cufed" else "random", **args)


def validation_geometry(spec: dict) -> dict:
    """The keyword arguments of :func:`amsa.training.correspondence.homography_pairs` in a ``val_data``
    (unknown keys are errors)."""
    args = {k: v for k, v in spec.items() if k in (*_GEOMETRY, "gt_size", "per_image", "seed")}
    unknown = sorted(set(spec) - set(args) - {"kind", "root", "folder", "files"})
    if unknown:
        raise ValueError(f"train-extractor: unknown val_data keys {unknown}")
    return args
