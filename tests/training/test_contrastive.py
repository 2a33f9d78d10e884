"""The matching extractor's losses: hand-computed cases (known correspondences, known margin
violations) and an independent loop over anchors in float64 on random inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from amsa.training.contrastive import contrastive_loss, distillation_loss, pair_losses


def _row(*vectors):
    """Feature map [C, 1, n] with the given (unnormalised) descriptors along one row."""
    return torch.tensor(vectors, dtype=torch.float64).T.reshape(len(vectors[0]), 1, len(vectors))


def test_contrastive_hand_computed_margin_violations():
    """Four cells in a row, identity correspondence, safe radius 1: anchor k's negatives are the cells
    two or more apart. Descriptors a0 = (1, 0), a1 = (0, 1), a2 = (-1, 0), a3 = (0.8, 0.6) (unit):
    d(a0, a3) = 2 - 1.6 = 0.4, d(a1, a3) = 2 - 1.2 = 0.8, d(a0, a2) = 4, d(a1, a3) = 0.8. Positives are
    0 (same features), so loss_k = relu(1 - hardest negative_k): 0.6, 0.2, 0 (a2's only negative is a0,
    distance 4), 0.6 -> mean 0.35; mean hardest negative (0.4 + 0.8 + 4 + 0.4) / 4 = 1.4."""
    f = _row((1, 0), (0, 1), (-1, 0), (0.8, 0.6))
    idx1 = torch.arange(4)
    pos2 = torch.tensor([[0, 0], [0, 1], [0, 2], [0, 3]])
    loss, pos, neg = contrastive_loss(f, f * 3.0, idx1, pos2, margin=1.0, safe_radius=1)
    assert math.isclose(loss.item(), 0.35, abs_tol=1e-12)
    assert math.isclose(pos.item(), 0.0, abs_tol=1e-12) and math.isclose(neg.item(), 1.4, abs_tol=1e-12)
    # margin 0.5: only anchors 0 and 3 violate it (0.5 - 0.4 each) -> 0.05
    loss, _, _ = contrastive_loss(f, f, idx1, pos2, margin=0.5, safe_radius=1)
    assert math.isclose(loss.item(), 0.05, abs_tol=1e-12)


def test_contrastive_negatives_in_both_directions():
    """Only cells 0 and 3 have a correspondence (to reference cells 0 and 3). In the reference direction
    anchor 0's candidates are the other correspondences (cell 3: d(a0, b3) = 0.4); in the input direction
    b0's candidates are *all* input cells farther than the radius (cells 2, 3: min(d(b0, a2) = 4,
    d(b0, a3) = 0.4)). A positive of distance 2 (b = a rotated by 90 degrees) shows in the loss."""
    f1 = _row((1, 0), (0, 1), (-1, 0), (0.8, 0.6))
    f2 = _row((0, 1), (1, 0), (1, 0), (0.8, 0.6))  # b0 = (0, 1): d(a0, b0) = 2
    idx1, pos2 = torch.tensor([0, 3]), torch.tensor([[0, 0], [0, 3]])
    loss, pos, neg = contrastive_loss(f1, f2, idx1, pos2, margin=1.0, safe_radius=1)
    # anchor 0: pos 2; neg2 = d(a0, b3) = 0.4; neg1 = min over a2, a3 of d(b0, .) = min(2, 0.8) = 0.8
    # anchor 3: pos 0; neg2 = d(a3, b0) = 2 - 1.2 = 0.8; neg1 = min over a0, a1 of d(b3, .) = min(0.4, 0.8)
    assert math.isclose(pos.item(), 1.0, abs_tol=1e-12)
    assert math.isclose(neg.item(), (0.4 + 0.4) / 2, abs_tol=1e-12)
    assert math.isclose(loss.item(), (max(0, 1 + 2 - 0.4) + max(0, 1 + 0 - 0.4)) / 2, abs_tol=1e-12)


def _loop_reference(f1, f2, idx1, pos2, margin, radius):
    c, h1, w1 = f1.shape
    a_all = F.normalize(f1.reshape(c, -1).T, dim=1)
    b = [F.normalize(f2[:, y, x], dim=0) for y, x in pos2.tolist()]
    losses = []
    for k, i in enumerate(idx1.tolist()):
        a = a_all[i]
        positive = 2 - 2 * a.dot(b[k])
        neg = math.inf
        for m, (y, x) in enumerate(pos2.tolist()):
            if max(abs(y - pos2[k, 0]), abs(x - pos2[k, 1])) > radius:
                neg = min(neg, float(2 - 2 * a.dot(b[m])))
        yi, xi = divmod(i, w1)
        for j in range(h1 * w1):
            yj, xj = divmod(j, w1)
            if max(abs(yi - yj), abs(xi - xj)) > radius:
                neg = min(neg, float(2 - 2 * b[k].dot(a_all[j])))
        losses.append(max(0.0, margin + float(positive) - neg))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_matches_a_loop_over_anchors(seed):
    g = torch.Generator().manual_seed(seed)
    f1 = torch.randn(5, 4, 5, generator=g, dtype=torch.float64)
    f2 = torch.randn(5, 5, 6, generator=g, dtype=torch.float64)
    idx1 = torch.randperm(20, generator=g)[:9]
    pos2 = torch.stack([torch.randint(0, 5, (9,), generator=g), torch.randint(0, 6, (9,), generator=g)], 1)
    loss, _, _ = contrastive_loss(f1, f2, idx1, pos2, margin=1.0, safe_radius=1)
    assert math.isclose(loss.item(), _loop_reference(f1, f2, idx1, pos2, 1.0, 1), rel_tol=1e-12)


def test_distillation_hand_computed():
    """Two correspondences. The teacher's correlation is the identity (orthogonal descriptors), the
    student's all equal (identical descriptors): P_t rows softmax((1, 0) / T), P_s rows (1/2, 1/2), so
    KL = sum_j p_j log(2 p_j) per row, the same for both rows."""
    T = 0.15
    teacher = (torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(torch.tensor([1 / T, 0.0], dtype=torch.float64), 0)
    expected = float((p * torch.log(2 * p)).sum())
    assert math.isclose(distillation_loss((same, same), teacher, T).item(), expected, rel_tol=1e-12)
    assert distillation_loss(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-12)


def test_pair_losses_with_and_without_teacher():
    g = torch.Generator().manual_seed(3)
    f1, f2 = torch.randn(4, 3, 3, generator=g), torch.randn(4, 3, 3, generator=g)
    idx1, pos2 = torch.tensor([0, 4, 8]), torch.tensor([[0, 0], [1, 1], [2, 2]])
    plain = pair_losses((f1, f2), idx1, pos2, margin=1.0, safe_radius=0)
    assert plain.distill is None
    taught = pair_losses((f1, f2), idx1, pos2, margin=1.0, safe_radius=0, teacher=(f1, f2))
    assert torch.equal(taught.contrastive, plain.contrastive)
    assert taught.distill.item() == pytest.approx(0.0, abs=1e-6)  # a student equal to its teacher
