"""Triton kernels of CFE-PatchMatch (paper section 3.1, Eq. 1-5) and their ``torch.library`` ops.

Layouts (prepared once per level by ``amsa.matching.triton_backend.TritonLevel``):
    query  [B, Hq, Wq, C] channels-last contiguous (fp32/fp16/bf16), qnorm [B, Hq, Wq] fp32 patch norms;
    ref    all references of the level concatenated as pixel rows [sum_r B*Hr_r*Wr_r, C], rnorm likewise;
    ref_meta int64 [R, 3]: (first pixel row of reference r, Hr_r, Wr_r);
    pos    int64 [R, B, Hq, Wq, 2] (y, x), score fp32 [R, B, Hq, Wq].
The grid is (pixel blocks, B, R): every reference of the level is matched in one launch. Element offsets
are computed in int64 (safe beyond 2^31 elements). One launch is one propagation step; positions are
read from one buffer and written to another, so no program reads what another writes (race-free).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import INTERPRET, alloc, alloc_like


@triton.jit
def _similarity(
    query_ptr, ref_ptr, rnorm_ptr,
    q_row, qy, qx, qn,          # [BLOCK_P] query centre row, its (y, x), its patch norm
    r_row0, cy, cx,             # row of pixel (0, 0) of this reference and batch; candidate (y, x)
    Hq, Wq, Hr, Wr, C, valid,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Eq. 1: cosine of the query 3x3 patches and the candidate reference 3x3 patches, [BLOCK_P] fp32.

    Gathers the 9 taps x C channels of both patches straight from the feature maps (zero outside),
    accumulates the inner product in fp32, divides by the precomputed patch norms (0 if either is 0)."""
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    for t in range(9):  # a loop, not unrolled: 16 candidates x 9 taps unrolled take minutes to compile
        dy = t // 3 - 1
        dx = t % 3 - 1
        ok = valid & (qy + dy >= 0) & (qy + dy < Hq) & (qx + dx >= 0) & (qx + dx < Wq)
        ok = ok & (cy + dy >= 0) & (cy + dy < Hr) & (cx + dx >= 0) & (cx + dx < Wr)
        q_off = (q_row + (dy * Wq + dx)) * C
        r_off = (r_row0 + (cy + dy) * Wr + (cx + dx)) * C
        for c0 in range(0, C, BLOCK_C):
            cm = ok[:, None] & ((c0 + offs_c) < C)[None, :]
            qv = tl.load(query_ptr + q_off[:, None] + (c0 + offs_c)[None, :], mask=cm, other=0.0)
            rv = tl.load(ref_ptr + r_off[:, None] + (c0 + offs_c)[None, :], mask=cm, other=0.0)
            acc += tl.sum(qv.to(tl.float32) * rv.to(tl.float32), axis=1)
    rn = tl.load(rnorm_ptr + r_row0 + cy * Wr + cx, mask=valid, other=0.0)
    den = qn * rn
    s = tl.where(den > 0, acc / tl.where(den > 0, den, 1.0), 0.0)
    return tl.minimum(tl.maximum(s, -1.0), 1.0)


@triton.jit
def _keep_better(ok, s, cy, cx, bs, by, bx):
    """Argmax update: a valid candidate replaces the current best only if strictly better."""
    better = ok & (s > bs)
    return tl.where(better, s, bs), tl.where(better, cy, by), tl.where(better, cx, bx)


@triton.jit
def _level_pixels(qnorm_ptr, ref_meta_ptr, B, Hq, Wq, BLOCK_P: tl.constexpr):
    """Index set-up shared by the kernels: this program's query pixels and its reference's geometry."""
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2).to(tl.int64)
    inb = offs < Hq * Wq
    qy = offs // Wq
    qx = offs % Wq
    q_row = (b * Hq + qy) * Wq + qx
    qn = tl.load(qnorm_ptr + q_row, mask=inb, other=0.0)
    Hr = tl.load(ref_meta_ptr + r * 3 + 1)
    Wr = tl.load(ref_meta_ptr + r * 3 + 2)
    r_row0 = tl.load(ref_meta_ptr + r * 3) + b * Hr * Wr
    state = (r * B + b) * Hq * Wq  # first pixel of (r, b) in pos/score
    return offs, inb, qy, qx, q_row, qn, Hr, Wr, r_row0, state


@triton.jit
def _patch_score_kernel(
    query_ptr, qnorm_ptr, ref_ptr, rnorm_ptr, ref_meta_ptr, pos_ptr, score_ptr,
    B, Hq, Wq, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Eq. 2: score[r, b, j] = r(j, pos[r, b, j]) for every query pixel j."""
    offs, inb, qy, qx, q_row, qn, Hr, Wr, r_row0, state = _level_pixels(
        qnorm_ptr, ref_meta_ptr, B, Hq, Wq, BLOCK_P)
    st = state + offs
    cy = tl.load(pos_ptr + st * 2, mask=inb, other=0)
    cx = tl.load(pos_ptr + st * 2 + 1, mask=inb, other=0)
    s = _similarity(query_ptr, ref_ptr, rnorm_ptr, q_row, qy, qx, qn, r_row0, cy, cx,
                    Hq, Wq, Hr, Wr, C, inb, BLOCK_P, BLOCK_C)
    tl.store(score_ptr + st, s, mask=inb)


@triton.jit
def _patchmatch_step_kernel(
    query_ptr, qnorm_ptr, ref_ptr, rnorm_ptr, ref_meta_ptr,
    pos_in_ptr, score_in_ptr, pos_out_ptr, score_out_ptr,
    B, Hq, Wq, C, k,
    OFFSET_CORRECTED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One propagation step at dilation k for every query pixel j (Eq. 3-5, then Ref propagation):

    LR propagation: candidates pos_in[u] for the 8 neighbours u = j + k*d inside the query grid
    (OFFSET_CORRECTED: pos_in[u] - k*d, clamped); Ref propagation: best + k*d, clamped to the reference.
    A candidate replaces the current best only if strictly better (ties keep the earlier one)."""
    offs, inb, qy, qx, q_row, qn, Hr, Wr, r_row0, state = _level_pixels(
        qnorm_ptr, ref_meta_ptr, B, Hq, Wq, BLOCK_P)
    st = state + offs
    by = tl.load(pos_in_ptr + st * 2, mask=inb, other=0)
    bx = tl.load(pos_in_ptr + st * 2 + 1, mask=inb, other=0)
    bs = tl.load(score_in_ptr + st, mask=inb, other=0.0)
    for n in range(8):  # the 8 neighbours d, in raster order (t = 4 is the pixel itself)
        t = n + n // 4
        dy = t // 3 - 1
        dx = t % 3 - 1
        uy = qy + dy * k
        ux = qx + dx * k
        ok = inb & (uy >= 0) & (uy < Hq) & (ux >= 0) & (ux < Wq)
        su = state + uy * Wq + ux
        cy = tl.load(pos_in_ptr + su * 2, mask=ok, other=0)
        cx = tl.load(pos_in_ptr + su * 2 + 1, mask=ok, other=0)
        if OFFSET_CORRECTED:
            cy = tl.minimum(tl.maximum(cy - dy * k, 0), Hr - 1)
            cx = tl.minimum(tl.maximum(cx - dx * k, 0), Wr - 1)
        s = _similarity(query_ptr, ref_ptr, rnorm_ptr, q_row, qy, qx, qn, r_row0, cy, cx,
                        Hq, Wq, Hr, Wr, C, ok, BLOCK_P, BLOCK_C)
        bs, by, bx = _keep_better(ok, s, cy, cx, bs, by, bx)
    oy = by
    ox = bx
    for n in range(8):
        t = n + n // 4
        cy = tl.minimum(tl.maximum(oy + (t // 3 - 1) * k, 0), Hr - 1)
        cx = tl.minimum(tl.maximum(ox + (t % 3 - 1) * k, 0), Wr - 1)
        s = _similarity(query_ptr, ref_ptr, rnorm_ptr, q_row, qy, qx, qn, r_row0, cy, cx,
                        Hq, Wq, Hr, Wr, C, inb, BLOCK_P, BLOCK_C)
        bs, by, bx = _keep_better(inb, s, cy, cx, bs, by, bx)
    tl.store(pos_out_ptr + st * 2, by, mask=inb)
    tl.store(pos_out_ptr + st * 2 + 1, bx, mask=inb)
    tl.store(score_out_ptr + st, bs, mask=inb)


def _blocks(C: int, n_pixels: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C). The interpreter runs programs one by one in NumPy, so there one large block
    is much faster than many small ones."""
    if INTERPRET:
        return min(1024, triton.next_power_of_2(n_pixels)), min(64, triton.next_power_of_2(C))
    return 64, min(64, triton.next_power_of_2(C))


def _grid(B: int, Hq: int, Wq: int, R: int, block_p: int):
    return (triton.cdiv(Hq * Wq, block_p), B, R)


@torch.library.triton_op("amsa::patch_score", mutates_args=())
def patch_score(
    query: torch.Tensor, qnorm: torch.Tensor, ref: torch.Tensor, rnorm: torch.Tensor,
    ref_meta: torch.Tensor, pos: torch.Tensor,
) -> torch.Tensor:
    """Scores [R, B, Hq, Wq] of positions [R, B, Hq, Wq, 2] (layouts in the module docstring)."""
    R, B, Hq, Wq, _ = pos.shape
    C = query.shape[-1]
    score = alloc((R, B, Hq, Wq), torch.float32, pos.device)
    bp, bc = _blocks(C, Hq * Wq)
    torch.library.wrap_triton(_patch_score_kernel)[_grid(B, Hq, Wq, R, bp)](
        query, qnorm, ref, rnorm, ref_meta, pos, score, B, Hq, Wq, C, BLOCK_P=bp, BLOCK_C=bc)
    return score


@torch.library.triton_op("amsa::patchmatch_step", mutates_args=())
def patchmatch_step(
    query: torch.Tensor, qnorm: torch.Tensor, ref: torch.Tensor, rnorm: torch.Tensor,
    ref_meta: torch.Tensor, pos: torch.Tensor, score: torch.Tensor, dilation: int, offset_corrected: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused propagation step at ``dilation`` for all references: new (pos, score)."""
    R, B, Hq, Wq, _ = pos.shape
    C = query.shape[-1]
    pos_out, score_out = alloc_like(pos), alloc_like(score)
    bp, bc = _blocks(C, Hq * Wq)
    torch.library.wrap_triton(_patchmatch_step_kernel)[_grid(B, Hq, Wq, R, bp)](
        query, qnorm, ref, rnorm, ref_meta, pos, score, pos_out, score_out, B, Hq, Wq, C, dilation,
        OFFSET_CORRECTED=offset_corrected, BLOCK_P=bp, BLOCK_C=bc)
    return pos_out, score_out
