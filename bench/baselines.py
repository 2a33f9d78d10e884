"""Baseline matchers the benchmarks compare CFE-PatchMatch against, each returning an ``amsa.Match``.

- :func:`c2_enumerated`: enumerated matching as C2-Matching does it: normalised reference patches as the
  filters of a convolution over the query, in chunks of filters, fp32; argmax over the filters, then
  divided by the query patch norm (Eq. 1).
- :func:`chunked_matmul_argmax`: the strong enumerated baseline: normalised patch matrices multiplied in
  bf16 (or tf32) one block of reference patches at a time, keeping a running max/argmax (memory O(N)).
  Its fused Triton form (one kernel, tensor-core dots, running argmax in registers, CUDA only) is
  :func:`matmul_argmax_fused` (``kernels/enumerated.py``).
- :func:`official_patchmatch`: CFE-PatchMatch with the official release's data movement: every step
  gathers the 9 candidate patches of every query pixel, a [B, 9, 9C, H*W] tensor, and reduces it. It runs
  exactly our algorithm (same init, candidates, order and schedule as ``cfe_patchmatch``), so the speed
  difference is the data movement alone.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from amsa.matching import Match, check_matching, matmul_argmax
from amsa.matching.schedule import (
    NEIGHBOURS,
    dilations,
    feature_levels,
    random_positions,
    upsample_positions,
)
from amsa.matching.torch_backend import patch_norms, unfold_normalised
from bench.flops import enumerated_flops, official_patchmatch_flops


def _to_match(best: torch.Tensor, idx: torch.Tensor, hq: int, wq: int, wr: int, flops: int) -> Match:
    """Running max [B, Nq] and flat argmax [B, Nq] -> Match with (y, x) positions."""
    pos = torch.stack([idx // wr, idx % wr], dim=-1).view(-1, hq, wq, 2)
    return Match(pos, best.clamp(-1.0, 1.0).view(-1, hq, wq).float(), flops)


def _keep_better(best, idx, s, j, offset: int):
    """Running argmax: a block's maximum replaces the current best only if strictly better, so ties keep
    the lowest flat index (blocks come in index order, max() returns the first maximum)."""
    better = s > best
    return torch.where(better, s, best), torch.where(better, j + offset, idx)


@contextlib.contextmanager
def matmul_precision(precision: str):
    """'tf32': fp32 matmuls and convolutions on TF32 tensor cores (no effect on CPU); 'fp32' (or 'bf16',
    whose matmuls are bf16 anyway): full fp32, also for cuDNN convolutions (TF32 by default)."""
    old, old_cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
        torch.backends.cudnn.allow_tf32 = old_cudnn


@torch.no_grad()
def c2_enumerated(query: torch.Tensor, ref, *, chunk: int | None = None):
    """Enumerated matching, C2-Matching style (true fp32, cuDNN's TF32 off): ``F.conv2d(query,
    normalised ref patches)`` over chunks of ``chunk`` reference patches, argmax over them, score =
    max / ||query patch||.

    query [B, C, Hq, Wq], ref [B, C, Hr, Wr] (or a list) -> Match (or a list); same argmax as
    ``amsa.enumerated_match`` (dividing by the query norm does not move a row's argmax)."""
    refs, _, many = check_matching(query, ref)
    B, C, hq, wq = query.shape
    qnorm = patch_norms(query).view(B, -1)
    out = []
    for r in refs:
        hr, wr = r.shape[-2:]
        nr = hr * wr
        n = chunk or max(1, (64 << 20) // (4 * hq * wq))  # filters per conv: a ~64 MB score block
        filters = unfold_normalised(r).view(B, nr, C, 3, 3)  # C2-Matching's sample_patches + norm
        best = torch.full((B, hq * wq), -float("inf"), device=query.device)
        idx = torch.zeros(B, hq * wq, dtype=torch.int64, device=query.device)
        with matmul_precision("fp32"):
            for b in range(B):
                qb = query[b : b + 1].float()
                for i in range(0, nr, n):
                    s, j = F.conv2d(qb, filters[b, i : i + n], padding=1)[0].view(-1, hq * wq).max(0)
                    best[b], idx[b] = _keep_better(best[b], idx[b], s, j, i)
        score = torch.where(qnorm > 0, best / torch.where(qnorm > 0, qnorm, 1.0), 0.0)
        out.append(_to_match(score, idx, hq, wq, wr, enumerated_flops(B, C, (hq, wq), [(hr, wr)])))
    return out if many else out[0]


def _rows_dtype(precision: str) -> torch.dtype:
    """Dtype of the normalised patch rows for a matmul baseline's ``precision``."""
    if precision not in ("bf16", "tf32", "fp32"):
        raise ValueError(f"precision must be 'bf16', 'tf32' or 'fp32', got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


@torch.no_grad()
def chunked_matmul_argmax(query: torch.Tensor, ref, *, precision: str = "bf16", block: int | None = None):
    """Enumerated matching as a strong baseline would do it: S = Qn @ Rn^T (Eq. 1 on normalised
    [N, 9C] patch matrices) one block of ``block`` reference patches at a time, with a running max/argmax.

    precision: "bf16" (bf16 inputs, fp32 accumulation, the output block rounded to bf16 as torch's bf16
    matmul returns it: the argmax is exact up to one bf16 ulp of the scores), "tf32" or "fp32". Scores
    are those of the products; rescore positions with ``amsa.patch_similarity``."""
    dtype = _rows_dtype(precision)
    refs, _, many = check_matching(query, ref)
    B, C, hq, wq = query.shape
    qn = unfold_normalised(query).to(dtype)  # [B, Nq, 9C]
    out = []
    with matmul_precision(precision):
        for r in refs:
            hr, wr = r.shape[-2:]
            rn = unfold_normalised(r).to(dtype)
            n = block or max(1, (64 << 20) // (4 * B * hq * wq))
            best = torch.full((B, hq * wq), -float("inf"), device=query.device)
            idx = torch.zeros(B, hq * wq, dtype=torch.int64, device=query.device)
            for i in range(0, hr * wr, n):
                s, j = torch.bmm(qn, rn[:, i : i + n].transpose(1, 2)).float().max(2)
                best, idx = _keep_better(best, idx, s, j, i)
            out.append(_to_match(best, idx, hq, wq, wr, enumerated_flops(B, C, (hq, wq), [(hr, wr)])))
    return out if many else out[0]


def patch_rows(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Normalised 3x3 patch rows [B, h*w, 9C] of features [B, C, h, w] in the dtype of ``precision``,
    row-major (the layout the fused kernel reads with 16-byte vectors; 9C is a multiple of 16 for C a
    multiple of 16): the operands of the matmul baselines."""
    return unfold_normalised(x).to(_rows_dtype(precision)).contiguous()


@torch.no_grad()
def matmul_argmax_fused(query: torch.Tensor, ref, *, precision: str = "bf16"):
    """:func:`chunked_matmul_argmax` as one fused Triton kernel (``kernels.enumerated.matmul_argmax``):
    tile products on tensor cores, running max/argmax in registers, every reference in one launch; the
    [chunk, Nr] score blocks never reach memory (``amsa.matching.matmul_argmax``). CUDA tensors (CPU only
    under TRITON_INTERPRET=1).

    precision: "bf16" (bf16 rows, fp32 accumulation, fp32 output: no bf16 rounding of the scores), "tf32"
    or "fp32" (exact fp32 products). Ties: lowest flat index of the fp32 maximum."""
    _rows_dtype(precision)
    refs, _, many = check_matching(query, ref)
    B, C, hq, wq = query.shape
    qn = patch_rows(query, precision)
    found = matmul_argmax(qn, [patch_rows(r, precision) for r in refs], tf32=precision == "tf32")
    out = [_to_match(best, idx, hq, wq, r.shape[-1], enumerated_flops(B, C, (hq, wq), [r.shape[-2:]]))
           for (best, idx), r in zip(found, refs)]
    return out if many else out[0]


class _OfficialLevel:
    """One level as the official release holds it: normalised patches unfolded to [B, 9C, N] (Eq. 1 is
    then a plain inner product), candidates scored by gathering whole 9C columns."""

    def __init__(self, query: torch.Tensor, ref: torch.Tensor):
        self.qsize, self.rsize = tuple(query.shape[-2:]), tuple(ref.shape[-2:])
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        unfold = lambda x: F.normalize(F.unfold(x.to(acc), 3, padding=1), dim=1)  # zero patch -> 0
        self.q, self.r = unfold(query), unfold(ref)  # [B, 9C, Nq], [B, 9C, Nr]

    def scores(self, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
        """Scores of candidates (y, x) [B, m, Nq] -> [B, m, Nq]: per sample (as the official loops over
        samples), gather [1, m, 9C, Nq] and reduce it against the query."""
        m, nq = cy.shape[1:]
        K = self.q.shape[1]
        flat = cy * self.rsize[1] + cx
        out = []
        for b in range(self.q.shape[0]):
            index = flat[b][:, None, :].expand(m, K, nq)
            cand = torch.gather(self.r[b][None].expand(m, K, -1), 2, index)  # [m, 9C, Nq]
            out.append((cand * self.q[b][None]).sum(1))
        return torch.stack(out).clamp(-1.0, 1.0)

    def step(self, pos: torch.Tensor, score: torch.Tensor, k: int):
        """One propagation step at dilation k: LR propagation over [own, 8 neighbours' matches], then Ref
        propagation over [new own, own + k*d] (clamped); the first maximum wins (ties keep own)."""
        B = pos.shape[0]
        hq, wq = self.qsize
        hr, wr = self.rsize
        big = max(hq, wq) * k + 1
        padded = F.pad(pos.permute(0, 3, 1, 2), (k, k, k, k), value=-big)  # sentinel: outside the grid
        shifted = [padded[:, :, k + k * dy : k + k * dy + hq, k + k * dx : k + k * dx + wq]
                   for dy, dx in NEIGHBOURS]
        cand = torch.stack([pos.permute(0, 3, 1, 2), *shifted], dim=1).reshape(B, 9, 2, -1)
        valid = cand[:, :, 0] > -big
        cy, cx = cand[:, :, 0].clamp(0, hr - 1), cand[:, :, 1].clamp(0, wr - 1)
        s = torch.where(valid, self.scores(cy, cx), -float("inf"))
        best, j = s.max(1, keepdim=True)
        by, bx = cy.gather(1, j), cx.gather(1, j)
        d = torch.tensor([(0, 0), *NEIGHBOURS], device=pos.device)[None, :, :, None] * k  # [1, 9, 2, 1]
        ry, rx = (by + d[:, :, 0]).clamp(0, hr - 1), (bx + d[:, :, 1]).clamp(0, wr - 1)
        s2, j2 = self.scores(ry, rx).max(1, keepdim=True)
        new = torch.stack([ry.gather(1, j2), rx.gather(1, j2)], dim=-1).view(B, hq, wq, 2)
        return new, s2.view(B, hq, wq)


@torch.no_grad()
def official_patchmatch(query: torch.Tensor, ref, iters=(1, 1, 2, 6), *, seed: int = 0):
    """CFE-PatchMatch with the official release's data movement ([B, 9, 9C, H*W] gathers per step):
    the same positions as ``amsa.cfe_patchmatch(query, ref, iters, seed=seed, backend="torch")``
    (up to float near-ties). Levels, initialisation and passing up reuse the library's helpers."""
    refs, _, many = check_matching(query, ref)
    iters = tuple(iters)
    B, C = query.shape[:2]
    q_levels = feature_levels(query, len(iters), "query")
    out = []
    for r in refs:
        r_levels = feature_levels(r, len(iters), "ref")
        pos = score = None
        for lv, n_iter in enumerate(iters):
            level = _OfficialLevel(q_levels[lv], r_levels[lv])
            qsize, rsize = level.qsize, level.rsize
            if lv == 0:
                pos = random_positions(*qsize, *rsize, seed, query.device).expand(B, -1, -1, -1)
            else:
                pos = upsample_positions(pos, tuple(r_levels[lv - 1].shape[-2:]), rsize, qsize)
            flat = pos.reshape(B, 1, -1, 2)
            score = level.scores(flat[..., 0], flat[..., 1]).view(B, *qsize)
            for _ in range(n_iter):
                for k in dilations(qsize):
                    pos, score = level.step(pos, score, k)
        flops = official_patchmatch_flops(B, C, tuple(query.shape[-2:]), iters)
        out.append(Match(pos, score.to(torch.float64 if query.dtype == torch.float64 else torch.float32),
                         flops))
    return out if many else out[0]
