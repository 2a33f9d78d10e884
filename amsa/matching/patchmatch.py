"""CFE-PatchMatch: Coarse-to-Fine Embedded PatchMatch (paper section 3.1, Eq. 1-5).

For every pixel j of the query map K (features of the LR-upsampled image) find the position H_j in a
reference map Q_i whose 3x3 patch is most similar by the normalised inner product (Eq. 1)

    r(j, j') = < K_j / ||K_j||, Q_j' / ||Q_j'|| >,     K_j, Q_j' in R^{C*9}, zero padding at the borders,

with r = 0 when either patch is all zero. Embedded PatchMatch iterates *propagation steps*; one step at
dilation k does

    LR propagation  (Eq. 3-5): candidates H_j and H_u for the 8 neighbours u = j + k*d of j,
    Ref propagation:           candidates H_j + k*d, the 8 neighbours of the new own match (clamped),

and keeps the best candidate. CFE-PatchMatch runs this on the levels 1/8, 1/4, 1/2, 1 (for iters of length
4), passing positions up a level by scaling them.

Dilation rule (the paper's t): on a level whose query map is h x w, one iteration is the sweep of
dilations k = 2^t for t = 0, ..., T-1 with T = max(1, floor(log2(min(h, w) / 8))), i.e. the paper's
t = 0 .. log2(sqrt(N)/8) - 1 (Fig. 3) with sqrt(N) taken as the shorter side and the log rounded
down. The rule depends only on the query size, so references of any size share one schedule (and one
batched launch).

Three backends compute the same algorithm: PyTorch (:mod:`amsa.matching.torch_backend`: chunked gathers,
memory O(N*C); the reference), Triton (:mod:`amsa.matching.triton_backend`: one fused launch per step for
all references) and numba on CPU (:mod:`amsa.matching.cpu_backend`: the same fused step). Positions agree
between them up to near-ties: candidates whose scores differ by a few ulp, where the backends' summation
orders (and the compiled kernel's division) can round differently.
The schedule (levels, dilations, initialisation, passing up, FLOPs) is :mod:`amsa.matching.schedule`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from amsa._checks import as_list, check_features, check_finite, check_iters, check_pair, check_positions
from amsa.backends import check_backend, choose_backend
from amsa.matching.schedule import (
    CANDIDATES_PER_STEP,
    dilations,
    evaluation_flops,
    feature_levels,
    random_positions,
    upsample_positions,
)
from amsa.matching.torch_backend import TorchLevel, TorchLevels
from amsa.matching.types import Match, Pyramid, Snapshot

__all__ = ["CFEPatchMatch", "cfe_patchmatch", "patch_similarity"]


def _level(query: torch.Tensor, refs: list[torch.Tensor], backend: str):
    """One level's maps prepared for ``backend``: score_positions() and step() on stacked positions."""
    if backend == "triton":
        from amsa.matching.triton_backend import TritonLevel  # imported lazily: triton is only needed here

        return TritonLevel(query, refs)
    if backend == "numba":
        from amsa.matching.cpu_backend import CPULevel  # imported lazily: numba is only needed here

        return CPULevel(query, refs)
    return TorchLevels(query, refs)


def cfe_patchmatch(
    query,
    ref,
    iters: Sequence[int] = (1, 1, 2, 6),
    *,
    seed: int = 0,
    init=None,
    offset_corrected: bool = False,
    backend: str = "auto",
    history: bool = False,
):
    """CFE-PatchMatch of ``query`` against ``ref`` (paper section 3.1).

    Args:
        query: [B, C, Hq, Wq] features of the LR-upsampled image (K), or a :class:`Pyramid` of them.
        ref: [B, C, Hr, Wr] features of a reference (Q_i) or a Pyramid, or a list of those (the n
            multi-scale references): the result is then a list, matched in one batched launch per step.
        iters: iterations per level, coarse to fine; its length is the number of levels (4: 1/8 .. 1).
            (1, 1, 2, 6) is the paper, (1, 1, 1, 4) the official release, (n,) single-level PatchMatch.
        seed: seeds the random initialisation at the coarsest level. It depends only on ``seed`` and the map
            sizes, so a batch (or a list of references) gives what its members give one at a time.
        init: positions [B, h0, w0, 2] (y, x) at the coarsest level instead of random ones (a list with
            a list of references).
        offset_corrected: classic PatchMatch LR propagation: a neighbour u = j + k*d proposes its match
            minus k*d instead of its match as-is (paper, Eq. 5).
        backend: "auto" (Triton on CUDA, the numba kernels on CPU, PyTorch for float64), "torch", "triton"
            or "numba" (:mod:`amsa.backends`).
        history: keep a :class:`Snapshot` per level entry and per iteration in ``Match.history``.

    Returns a :class:`Match` (or a list of them). No gradient flows through matching; call
    :func:`patch_similarity` on ``pos`` for a differentiable score.
    """
    iters = check_iters(iters)
    refs, rnames, many = as_list(ref, "ref", single=(Pyramid,))
    q_levels = feature_levels(query, len(iters), "query")
    r_levels = [feature_levels(r, len(iters), name) for r, name in zip(refs, rnames)]
    for rl, name in zip(r_levels, rnames):
        check_pair(q_levels[-1], rl[-1], "query", name)
    # NaN/Inf: every level of an explicit Pyramid; area-downsampled levels inherit them from the finest.
    for x, levels, name in zip([query, *refs], [q_levels, *r_levels], ["query", *rnames]):
        for lv in levels if isinstance(x, Pyramid) else levels[-1:]:
            check_finite(lv, name)
    finest = q_levels[-1]
    backend = choose_backend(backend, finest.device, finest.dtype, "cfe_patchmatch")
    B, C = finest.shape[:2]
    device = finest.device

    inits = None
    if init is not None:
        inits, inames, _ = as_list(init, "init") if many else ([init], ["init"], False)
        if len(inits) != len(refs):
            raise ValueError(f"init has {len(inits)} entries but there are {len(refs)} references")
        for p, rl, name in zip(inits, r_levels, inames):
            check_positions(p, name, B, tuple(q_levels[0].shape[-2:]), tuple(rl[0].shape[-2:]), device)

    with torch.no_grad():
        pos = score = None
        flops = 0
        snaps: list[list[Snapshot]] = [[] for _ in refs]
        for lv, n_iter in enumerate(iters):
            level = _level(q_levels[lv], [rl[lv] for rl in r_levels], backend)
            qsize = tuple(q_levels[lv].shape[-2:])
            rsizes = [tuple(rl[lv].shape[-2:]) for rl in r_levels]
            if lv == 0:
                if inits is not None:
                    pos = torch.stack([p.to(torch.int64) for p in inits])
                else:
                    pos = torch.stack([random_positions(*qsize, *rs, seed, device).expand(B, -1, -1, -1)
                                       for rs in rsizes])
            else:
                prev = [tuple(rl[lv - 1].shape[-2:]) for rl in r_levels]
                pos = torch.stack([upsample_positions(p, pr, rs, qsize)
                                   for p, pr, rs in zip(pos, prev, rsizes)])
            per_eval = evaluation_flops(B, C, qsize)
            score = level.score_positions(pos)
            flops += per_eval

            for it in range(n_iter + 1):
                if it > 0:
                    for k in dilations(qsize):
                        pos, score = level.step(pos, score, k, offset_corrected)
                        flops += CANDIDATES_PER_STEP * per_eval
                if history:
                    for r, rs in enumerate(rsizes):
                        snaps[r].append(Snapshot(lv, it, pos[r].clone(), score[r].clone(), flops, qsize, rs))
    out = [Match(pos[r], score[r], flops, snaps[r] if history else None)
           for r in range(len(refs))]
    return out if many else out[0]


def patch_similarity(query: torch.Tensor, ref: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Eq. 2: similarity of every query patch with the reference patch at ``pos`` [B, Hq, Wq, 2] (y, x):
    [B, Hq, Wq] fp32. Differentiable in query and ref (PyTorch ops on every device)."""
    check_features(query, "query")
    check_features(ref, "ref")
    check_pair(query, ref, "query", "ref")
    check_finite(query, "query")
    check_finite(ref, "ref")
    check_positions(pos, "pos", query.shape[0], tuple(query.shape[-2:]), tuple(ref.shape[-2:]),
                     query.device)
    return TorchLevel(query, ref).score_positions(pos.to(torch.int64))


class CFEPatchMatch(torch.nn.Module):
    """:func:`cfe_patchmatch` as a module: ``CFEPatchMatch(iters=(1, 1, 2, 6))(query, ref) -> Match``."""

    def __init__(self, iters: Sequence[int] = (1, 1, 2, 6), *, seed: int = 0,
                 offset_corrected: bool = False, backend: str = "auto"):
        super().__init__()
        self.iters = check_iters(iters)
        check_backend(backend, "CFEPatchMatch")
        self.seed, self.offset_corrected, self.backend = seed, offset_corrected, backend

    def forward(self, query, ref, init=None):
        return cfe_patchmatch(query, ref, self.iters, seed=self.seed, init=init,
                              offset_corrected=self.offset_corrected, backend=self.backend)

    def extra_repr(self) -> str:
        return f"iters={self.iters}, seed={self.seed}, offset_corrected={self.offset_corrected}, " \
               f"backend={self.backend!r}"
