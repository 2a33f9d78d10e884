"""How good matching features are, in a unit a user understands: on pairs with known geometry, the % of
LR-up cells whose match lies within 2 cells of the true correspondence.

Matching runs where AMSA runs it: on the grid of the extractor's features, stride 4 (one cell per LR
pixel), 3x3 patches, cosine relevance (Eq. 1). For every LR-up cell whose true correspondence lies inside
the reference (its 3x3 patch included), the match of exact enumerated matching and of CFE-PatchMatch
(paper schedule 1-1-2-6) is compared with the truth; ``within`` is the % at distance <= ``tolerance``
cells (2 cells = 8 HR pixels). Features come from :class:`amsa.models.matching_features.MatchingFeatures` (the
learned extractor, the filter bank, or a random-weight extractor).

The truth of a cell is where its centre (HR pixel ``4i + 1.5``) lands in the reference, in cells
(``(p - 1.5) / 4``; :func:`amsa.grid.grid_truth`): :class:`KnownPair` holds it for pairs made by a
homography (:func:`homography_pairs`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from amsa.grid import cell_centres, grid_truth
from amsa.matching import cfe_patchmatch, enumerated_match
from amsa.training.pairs import STRIDE, HomographyPairSet, apply_homography

__all__ = ["PAPER_ITERS", "TOLERANCE", "Accuracy", "KnownPair", "baselines", "correspondence_accuracy",
           "errors", "homography_pairs", "main_eval_extractor"]

PAPER_ITERS = (1, 1, 2, 6)
TOLERANCE = 2.0  # cells of the matching grid


@dataclass(frozen=True)
class KnownPair:
    """An LR-up image, a reference and the truth on the matching grid.

    ``lr_up`` [1, 3, H, W], ``ref`` [1, 3, Hr, Wr] (sharp; H, W, Hr, Wr multiples of 4); ``truth``
    [H/4, W/4, 2] float (row, col) reference cell of every LR-up cell (NaN where unknown); ``inside``
    [H/4, W/4] bool: the truth is known and its 3x3 patch lies inside the reference grid."""

    name: str
    lr_up: torch.Tensor
    ref: torch.Tensor
    truth: torch.Tensor
    inside: torch.Tensor


def homography_pairs(paths: Sequence[str], per_image: int = 2, *, gt_size: int = 192, seed: int = 0,
                     **geometry) -> list[KnownPair]:
    """``per_image`` pairs of every image (:class:`amsa.training.pairs.HomographyPairSet` items with the
    seeds ``seed * 2^20 + k``), without augmentation; ``geometry`` as there."""
    data = HomographyPairSet(paths, gt_size=gt_size, flip=False, rot90=False, **geometry)
    pairs = []
    for i in range(len(paths)):
        for k in range(per_image):
            s = data[(i, seed * 2**20 + i * per_image + k)]
            xy = apply_homography(s["homography"], cell_centres((gt_size // STRIDE,) * 2, STRIDE).flip(-1))
            ref = s["img_ref"][None]
            truth, inside = grid_truth(xy.flip(-1), tuple(ref.shape[-2:]), STRIDE)
            pairs.append(KnownPair(s["name"], s["img_in_up"][None], ref, truth, inside))
    return pairs


@dataclass(frozen=True)
class Accuracy:
    """% of inside cells within ``TOLERANCE`` of the truth for exact (``exact``) and CFE-PatchMatch
    (``cfe``) matches, over ``cells`` cells of ``pairs`` pairs (pooled over pairs)."""

    exact: float
    cfe: float
    cells: int
    pairs: int

    def as_dict(self) -> dict:
        return {"within2_exact": self.exact, "within2_cfe": self.cfe, "cells": self.cells}


def errors(pos: torch.Tensor, pair: KnownPair) -> torch.Tensor:
    """[h, w] Euclidean distance in cells of matched positions ``pos`` [h, w, 2] to the truth."""
    return (pos.to(torch.float32) - pair.truth.to(pos.device)).norm(dim=-1)


def _module_device(features: Callable) -> torch.device | None:
    """The device of a module's first parameter (or buffer); ``None`` for a plain callable or an empty
    module (the images then stay where they are)."""
    if not isinstance(features, nn.Module):
        return None
    first = next(itertools.chain(features.parameters(), features.buffers()), None)
    return None if first is None else first.device


@torch.no_grad()
def correspondence_accuracy(features: Callable, pairs: Sequence[KnownPair], *, iters=PAPER_ITERS,
                            seed: int = 0, tolerance: float = TOLERANCE) -> Accuracy:
    """Match every pair on ``features(lr_up, ref) -> (K, Q)`` (stride 4) exactly and with CFE-PatchMatch
    ``iters`` (seeded) and count the inside cells within ``tolerance`` cells of the truth. The pairs'
    images are moved to the device of ``features`` when it is a module with parameters or buffers."""
    hits = {"exact": 0, "cfe": 0}
    total = 0
    device = _module_device(features)
    for pair in pairs:
        lr_up, ref = pair.lr_up, pair.ref
        if device is not None:
            lr_up, ref = lr_up.to(device), ref.to(device)
        q, r = features(lr_up, ref)
        if tuple(q.shape[-2:]) != tuple(pair.truth.shape[:2]):
            raise ValueError(f"features: expected a {tuple(pair.truth.shape[:2])} grid (stride {STRIDE}) for "
                             f"{pair.name}, got {tuple(q.shape[-2:])}")
        inside = pair.inside.to(q.device)
        for key, m in (("exact", enumerated_match(q, r)), ("cfe", cfe_patchmatch(q, r, iters, seed=seed))):
            hits[key] += int((errors(m.pos[0], pair)[inside] <= tolerance).sum())
        total += int(inside.sum())
    if total == 0:
        raise ValueError("correspondence_accuracy: no cell has its true correspondence inside the reference")
    return Accuracy(100.0 * hits["exact"] / total, 100.0 * hits["cfe"] / total, total, len(pairs))


def baselines(feature_weights: str) -> dict[str, Callable]:
    """The extractors :func:`main_eval_extractor` compares: the given weights, the fixed filter bank, an
    untrained ``ContrasExtractorSep`` (seed 0: two independent random branches) and one random branch
    used on both sides (seed 0)."""
    import warnings

    from amsa.models import ContrasExtractorSep
    from amsa.models.matching_features import MatchingFeatures

    learned = ContrasExtractorSep(weights=feature_weights)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message="ContrasExtractorSep: no weights given")
        torch.manual_seed(0)
        random = ContrasExtractorSep()
    shared = MatchingFeatures(random.feature_extraction_image1, random.feature_extraction_image1, 4,
                              "random, one branch on both sides", normalise=True)
    return {"learned": MatchingFeatures.learned(learned.eval()),
            "filter bank": MatchingFeatures.filter_bank(),
            "random": MatchingFeatures.learned(random.eval(), "random"), "random shared": shared.eval()}


def main_eval_extractor(config: str, feature_weights: str, *, json_path: str | None = None) -> int:
    """``python -m amsa eval-extractor``: the table of :func:`baselines` on a config's ``val_data``."""
    from amsa.io import write_json
    from amsa.training.config import load_config
    from amsa.training.extractor_config import ExtractorConfig, pair_paths, validation_geometry

    cfg = load_config(config, ExtractorConfig, what="eval-extractor")
    if not cfg.val_data:
        raise ValueError(f"eval-extractor: {config!r} has no val_data")
    pairs = homography_pairs(pair_paths(cfg.val_data), **validation_geometry(cfg.val_data))
    print(f"{len(pairs)} held-out pairs ({', '.join(p.name for p in pairs)}); % of the LR-up cells whose "
          f"true correspondence is inside the reference, matched within {TOLERANCE:g} cells of it")
    print(f"{'features':<34} {'exact %':>8} {'CFE 1-1-2-6 %':>14}")
    results = {}
    for name, features in baselines(feature_weights).items():
        acc = correspondence_accuracy(features, pairs)
        results[name] = acc.as_dict()
        label = f"{name} ({feature_weights})" if name == "learned" else name
        print(f"{label:<34} {acc.exact:>8.2f} {acc.cfe:>14.2f}")
    if json_path:
        write_json(json_path, {"config": config, "feature_weights": feature_weights, "pairs": len(pairs),
                               **results})
    return 0
