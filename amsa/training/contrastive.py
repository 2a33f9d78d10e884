"""Losses of the matching extractor (C2-Matching's two stages, which AMSA's release trains unchanged).

On L2-normalised descriptors the distance is ``d(a, b) = 2 - 2 a.b`` (the squared Euclidean distance).
For the ``n`` ground-truth correspondences ``(i, i')`` of one pair (:func:`amsa.training.pairs.
feature_correspondences`), with ``a_i`` the input descriptor and ``b_i`` the reference descriptor at its
true cell:

* **contrastive** (stage 1, the teacher; stage 2 too): ``mean_i relu(margin + d(a_i, b_i) - min(n1_i,
  n2_i))`` with the hardest negatives ``n2_i = min_j d(a_i, b_j)`` over the other correspondences whose
  reference cell is farther than ``safe_radius`` cells (Chebyshev) from ``i'``, and ``n1_i = min_k
  d(b_i, a_k)`` over *all* input cells ``k`` farther than ``safe_radius`` from ``i`` (official: margin 1,
  safe radius 4);
* **distillation** (stage 2, the student on LR-up): ``KL(P_teacher || P_student)`` of the row-wise
  softmax of the correspondence correlation ``a_i . b_j / T`` (T = 0.15), summed over columns and averaged
  over rows (``F.kl_div(..., reduction="batchmean")``); the teacher sees the sharp input, the student its
  LR-up, both the same reference.

* **InfoNCE** (an option of ours, off in the official presets): the same softmax against the *true*
  correspondences, ``-mean_i log softmax_j(a_i . b_j / T)_i``, i.e. the distillation term with a perfect
  teacher. Unlike the hardest-negative hinge, whose value at collapse (every descriptor equal) is exactly
  the margin, it pushes all other correspondences away at every step; from a random start (no ImageNet
  VGG16 offline) the hinge alone collapses, so the CPU presets add it.

All are computed per pair; :func:`pair_losses` returns the terms of one pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PairLoss", "contrastive_loss", "descriptors", "distillation_loss", "info_nce_loss", "pair_losses"]

# Added to the distance of excluded (too close) candidates so the min never picks them (d <= 4 otherwise).
_EXCLUDED = 10.0


def descriptors(features: torch.Tensor) -> torch.Tensor:
    """[C, h, w] feature map -> [h * w, C] L2-normalised descriptors (row-major cells)."""
    c = features.shape[0]
    return F.normalize(features.reshape(c, -1).T, dim=1)


def _grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], 1)


def _chebyshev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, 2] and [m, 2] integer cells -> [n, m] max(|dy|, |dx|)."""
    return (a[:, None, :] - b[None, :, :]).abs().amax(-1)


def contrastive_loss(
    f1: torch.Tensor, f2: torch.Tensor, idx1: torch.Tensor, pos2: torch.Tensor, *, margin: float = 1.0,
    safe_radius: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hardest-negative margin loss of one pair (module docstring).

    Args:
        f1: input features [C, h1, w1]; f2: reference features [C, h2, w2].
        idx1: [n] flat input cells with a correspondence; pos2: [n, 2] their reference cells (row, col).
    Returns ``(loss, mean positive distance, mean hardest-negative distance)``, scalars.
    """
    h1, w1 = f1.shape[-2:]
    all1 = descriptors(f1)
    a = all1[idx1]
    b = F.normalize(f2[:, pos2[:, 0], pos2[:, 1]].T, dim=1)
    positive = 2 - 2 * (a * b).sum(1)
    near2 = _chebyshev(pos2, pos2) <= safe_radius
    neg2 = (2 - 2 * a @ b.T + _EXCLUDED * near2).amin(1)
    cells1 = _grid(h1, w1, f1.device)
    near1 = _chebyshev(cells1[idx1], cells1) <= safe_radius
    neg1 = (2 - 2 * b @ all1.T + _EXCLUDED * near1).amin(1)
    negative = torch.minimum(neg1, neg2)
    return F.relu(margin + positive - negative).mean(), positive.mean(), negative.mean()


def distillation_loss(student: tuple[torch.Tensor, torch.Tensor], teacher: tuple[torch.Tensor, torch.Tensor],
                      temperature: float = 0.15) -> torch.Tensor:
    """``KL(softmax(t_a t_b^T / T) || softmax(s_a s_b^T / T))``, rows averaged: ``student`` and
    ``teacher`` are ``(a, b)`` pairs of [n, C] normalised descriptors at the n correspondences."""
    s = F.log_softmax(student[0] @ student[1].T / temperature, dim=1)
    t = F.softmax(teacher[0] @ teacher[1].T / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean")


def info_nce_loss(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.15) -> torch.Tensor:
    """``-mean_i log softmax(a b^T / T)[i, i]`` for [n, C] normalised descriptors at n correspondences."""
    logits = a @ b.T / temperature
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


@dataclass
class PairLoss:
    """The loss terms of one pair: ``contrastive``, ``positive`` and ``negative`` (mean distances, for
    the log), ``distill`` (``None`` without a teacher) and ``nce`` (``None`` unless asked for)."""

    contrastive: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    distill: torch.Tensor | None = None
    nce: torch.Tensor | None = None


def pair_losses(
    student: tuple[torch.Tensor, torch.Tensor], idx1: torch.Tensor, pos2: torch.Tensor, *, margin: float,
    safe_radius: float, teacher: tuple[torch.Tensor, torch.Tensor] | None = None, temperature: float = 0.15,
    nce: bool = False,
) -> PairLoss:
    """Terms of one pair from its feature maps ``(f1 [C, h1, w1], f2 [C, h2, w2])`` (the teacher's as well
    in stage 2) and ground truth ``idx1``, ``pos2``; ``nce`` adds the InfoNCE term."""
    f1, f2 = student
    terms = PairLoss(*contrastive_loss(f1, f2, idx1, pos2, margin=margin, safe_radius=safe_radius))
    at = lambda f: (descriptors(f[0])[idx1], F.normalize(f[1][:, pos2[:, 0], pos2[:, 1]].T, dim=1))
    if teacher is not None:
        terms.distill = distillation_loss(at(student), at(teacher), temperature)
    if nce:
        terms.nce = info_nce_loss(*at(student), temperature)
    return terms
