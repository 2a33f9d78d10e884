"""How fast CFE-PatchMatch converges to enumerated matching (the paper's Fig. 5, section 5).

A run with ``history=True`` keeps the state after every iteration (:class:`amsa.Snapshot`). Each state
is brought to full resolution (:func:`amsa.upsample_positions`, the same rule that passes a level up) and
compared there with the exact matches H* of :func:`amsa.enumerated_match` on the same features:

* ``mse_score``: MSE of the relevance maps, mean over the B*Hq*Wq query pixels j of
  ``(S_j - S*_j)^2`` with ``S_j = r(j, H_j)`` (Eq. 2) and ``S*_j = r(j, H*_j)``, both recomputed at full
  resolution by :func:`amsa.patch_similarity` (so equal positions give exactly 0). Since H* is the
  argmax, ``S_j <= S*_j``; within one level's iterations at full resolution S_j never decreases, so this
  MSE never increases there (coarse states brought up carry no such guarantee).
* ``mse_warped``: MSE of the reference features warped by the matched positions, mean over the
  B*Hq*Wq*C values of ``(Q[c, H_j] - Q[c, H*_j])^2`` (Q: the reference features as matched; the centre
  pixel of each matched patch is what the Dynamic Aggregation, Eq. 6, starts from). Not monotone: a
  better-scoring patch can hold features farther from the optimum's.
* ``agreement``: % of query pixels with ``H_j = H*_j``.

Two ways of counting iterations:

* ``iteration``: every iteration counts one, whatever its level (the paper's Fig. 5 axis: CFE-PatchMatch
  1-1-2-6 and single-level PatchMatch both "converge in 10 iterations"); entering a finer level counts
  none.
* ``full_res_iters``: the work so far in units of one full-resolution iteration, i.e. cumulative
  analytic FLOPs / FLOPs of one iteration at full resolution. An iteration on level 1/2^l has 1/4^l of
  the pixels and (by the dilation rule, :func:`amsa.dilations`) l fewer dilation steps, which is the
  paper's cost model: its O(85/64 MN log(sqrt(N)/8) - 27/64 MN) for CFE-PatchMatch.
"""

from __future__ import annotations

import torch

from amsa.matching import Match, patch_similarity
from amsa.matching.schedule import CANDIDATES_PER_STEP, dilations, evaluation_flops, upsample_positions

__all__ = ["CURVE_KEYS", "TRUTH_KEYS", "convergence_curve", "full_iteration_flops", "value_at"]

CURVE_KEYS = (
    "iteration",
    "full_res_iters",
    "level",
    "gflops",
    "mean_score",
    "agreement",
    "mse_score",
    "mse_warped",
)
# With the true correspondences (``truth``, ``inside``): agreement and MSE(S) on the query pixels whose
# true correspondence lies inside the reference (``_in``) and on the others (``_out``, where the exact
# optimum is only the best look-alike), and the % of inside pixels within 2 pixels of the truth.
TRUTH_KEYS = ("agreement_in", "agreement_out", "mse_score_in", "mse_score_out", "within_in")
TOLERANCE = 2.0


def full_iteration_flops(query: torch.Tensor) -> int:
    """Analytic FLOPs of one iteration of Embedded PatchMatch at the resolution of ``query``
    [B, C, H, W]: every dilation step evaluates CANDIDATES_PER_STEP 3x3xC patch inner products per pixel
    (the same count :func:`amsa.cfe_patchmatch` reports)."""
    B, C, H, W = query.shape
    return len(dilations((H, W))) * CANDIDATES_PER_STEP * evaluation_flops(B, C, (H, W))


def _warp(ref: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Reference features at the matched positions (the warp of Eq. 6 at the patch centres):
    ref [B, C, Hr, Wr], pos [B, Hq, Wq, 2] -> [B, C, Hq, Wq]."""
    B, C, _, Wr = ref.shape
    flat = (pos[..., 0] * Wr + pos[..., 1]).reshape(B, 1, -1).expand(B, C, -1)
    return ref.reshape(B, C, -1).gather(2, flat).view(B, C, *pos.shape[1:3])


def _mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return x[mask].mean().item() if bool(mask.any()) else float("nan")


def convergence_curve(
    match: Match, query: torch.Tensor, ref: torch.Tensor, exact: Match, *,
    truth: torch.Tensor | None = None, inside: torch.Tensor | None = None,
) -> dict[str, list]:
    """Per snapshot of ``match.history`` (a run with ``history=True``), its state brought to full
    resolution and compared with ``exact`` (enumerated matching of ``query`` [B, C, Hq, Wq] against
    ``ref`` [B, C, Hr, Wr], the full-resolution maps the run matched). Returns a list per key of
    :data:`CURVE_KEYS` (see the module docstring): ``iteration``, ``full_res_iters``, ``level``,
    ``gflops`` (cumulative), ``mean_score`` (mean S at full resolution), ``agreement`` (%),
    ``mse_score``, ``mse_warped``; with ``truth`` [Hq, Wq, 2] (true reference positions, float, in the
    grid's pixels) and ``inside`` [Hq, Wq] bool, also :data:`TRUTH_KEYS` (NaN for an empty kind)."""
    if not match.history:
        raise ValueError("convergence_curve needs a Match computed with history=True")
    q_size, r_size = tuple(query.shape[-2:]), tuple(ref.shape[-2:])
    if tuple(exact.pos.shape[1:3]) != q_size:
        raise ValueError(f"exact.pos must be [B, {q_size[0]}, {q_size[1]}, 2], got {list(exact.pos.shape)}")
    best = patch_similarity(query, ref, exact.pos).double()
    best_warped = _warp(ref, exact.pos).double()
    unit = full_iteration_flops(query)
    keys = CURVE_KEYS + (TRUTH_KEYS if truth is not None else ())
    curve: dict[str, list] = {k: [] for k in keys}
    if truth is not None:
        truth, inside = truth.to(query.device), inside.to(query.device).expand(query.shape[0], -1, -1)
    done = 0
    for snap in match.history:
        done += snap.iteration > 0
        pos = snap.pos
        if tuple(pos.shape[1:3]) != q_size or tuple(snap.ref_size) != r_size:
            pos = upsample_positions(pos, tuple(snap.ref_size), r_size, q_size)
        score = patch_similarity(query, ref, pos).double()
        curve["iteration"].append(done)
        curve["full_res_iters"].append(snap.flops / unit)
        curve["level"].append(snap.level)
        curve["gflops"].append(snap.flops / 1e9)
        curve["mean_score"].append(score.mean().item())
        same = (pos == exact.pos).all(-1).double()
        sq = (score - best).square()
        curve["agreement"].append(100.0 * same.mean().item())
        curve["mse_score"].append(sq.mean().item())
        curve["mse_warped"].append((_warp(ref, pos).double() - best_warped).square().mean().item())
        if truth is not None:
            near = ((pos.double() - truth.double()).norm(dim=-1) <= TOLERANCE).double()
            curve["agreement_in"].append(100.0 * _mean(same, inside))
            curve["agreement_out"].append(100.0 * _mean(same, ~inside))
            curve["mse_score_in"].append(_mean(sq, inside))
            curve["mse_score_out"].append(_mean(sq, ~inside))
            curve["within_in"].append(100.0 * _mean(near, inside))
    return curve


def value_at(xs: list[float], ys: list[float], x: float) -> float:
    """``ys`` linearly interpolated at ``x`` along the increasing ``xs`` (a curve's value at a given
    FLOP count); ``x`` outside ``[xs[0], xs[-1]]`` raises, since extrapolating a curve is a guess."""
    if not xs or len(xs) != len(ys):
        raise ValueError(f"value_at needs equally long non-empty xs and ys, got {len(xs)} and {len(ys)}")
    if not xs[0] <= x <= xs[-1]:
        raise ValueError(f"value_at: x = {x:g} is outside the curve's range [{xs[0]:g}, {xs[-1]:g}]")
    for i in range(1, len(xs)):
        if xs[i] >= x:
            x0, x1 = xs[i - 1], xs[i]
            if x1 == x0:
                return ys[i]
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)
    return ys[0]  # one point, equal to x
