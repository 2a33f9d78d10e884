"""Triton kernels of CFE-PatchMatch (paper section 3.1, Eq. 1-5) and their ``torch.library`` ops.

Layouts (prepared once per level by ``amsa.matching.triton_backend.TritonLevel``; ``PaddedLayout`` below
says how): every map is zero-padded by one pixel and stored channels-last with its channels padded with
zeros to CP = CR * CL, so a 3x3 tap is one contiguous row of CP values and no load needs a mask (the zero
border is the paper's zero padding; zero channels add nothing to an inner product):
    query  [B, Hq+2, Wq+2, CP] (fp32/fp16/bf16), qnorm [B, Hq, Wq] fp32 patch norms;
    ref    the references of the level, each [B, Hr+2, Wr+2, CP], flattened and concatenated; rnorm
           their [B, Hr, Wr] norms flattened and concatenated;
    ref_meta int64 [R, 4]: (first padded pixel of reference r in ref, first element in rnorm, Hr, Wr);
    pos    int64 [R, B, Hq, Wq, 2] (y, x), score fp32 [R, B, Hq, Wq].

A program owns a TH x TW tile of query pixels of one (batch, reference): grid (tiles, B, R), every
reference of the level in one launch. Each pixel's 3x3xCP query patch is loaded once and held in
registers across all 16 candidates; a candidate costs 9 unmasked 16-byte-vector row gathers, fp32
multiply-adds kept per lane over the 9 taps, and one reduction. A tap row is [CR, P, CL] (or [P, CR, CL],
see ``_TAPS_OUTER``): lanes (and 16-byte vectors) run along CL channels, CR channel rows stay in each
lane's registers, so that a pixel sits in one warp (P = pixels of the tile, one or more per warp) and the
reduction never leaves it. Addresses come from one int64 base per (batch, reference) plane: a patch
centre's offset in its plane is int32 (WIDE: int64, for maps of 2^31 elements or more), the tap and
channel offsets are added in 64 bits, so that they fold into the loads' immediate fields (sign-extended
int32 sums would not). One launch is one propagation step; positions are read from one buffer and
written to another, so no program reads what another writes (race-free).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels._common import INTERPRET, alloc, alloc_like

_INT32_MAX = 2**31 - 1
# Where a tile's pixel axis goes. Triton gives the lanes to the channel axis (the only contiguous one) and
# the warps to the next axis in its order, and that order breaks the tie between the other axes the
# other way round from 3.7 on (seen on the sm_90 compile of 3.6, 3.7, 3.8 and 3.9): the pixel axis is
# put where each version hands out the warps, so that a pixel's taps and channel rows stay in its lanes'
# registers ([taps, CR, P, CL] from 3.7 on, [P, taps, CR, CL] before; the other order costs shared-memory
# round trips and twice the instructions).
_TAPS_OUTER = tl.constexpr(tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7))
_SMS = 132  # H200 multiprocessors: the launcher shrinks tiles when a level has too few of them to fill


@dataclass(frozen=True)
class PaddedLayout:
    """Channel padding of the maps for C channels of ``elem`` bytes: CP = CR * CL channels, CL lanes'
    worth of 16-byte vectors (at most one warp-wide row, 512 bytes), CR rows of them (a power of two)."""

    C: int
    elem: int

    @property
    def CL(self) -> int:
        if INTERPRET:  # no lanes in the interpreter: one row
            return max(16 // self.elem, triton.next_power_of_2(self.C))
        return max(16 // self.elem, min(triton.next_power_of_2(self.C), 512 // self.elem))

    @property
    def CR(self) -> int:
        return triton.next_power_of_2(triton.cdiv(self.C, self.CL))

    @property
    def CP(self) -> int:
        return self.CR * self.CL


def pad_map(x: torch.Tensor, cp: int) -> torch.Tensor:
    """[B, C, h, w] -> zero-padded channels-last [B, h+2, w+2, cp] (contiguous, one copy)."""
    B, C, h, w = x.shape
    out = x.new_zeros(B, h + 2, w + 2, cp)
    out[:, 1 : h + 1, 1 : w + 1, :C] = x.permute(0, 2, 3, 1)
    return out


@triton.jit
def _channels(CR: tl.constexpr, CL: tl.constexpr):
    """Channel offsets of one tap row: [CR, 1, CL] (the pixel axis in the middle), or [1, CR, CL]."""
    if _TAPS_OUTER:  # one return after the branches: Triton visits code after a taken static branch
        ch = tl.arange(0, CR)[:, None, None] * CL + tl.arange(0, CL)[None, None, :]
    else:
        ch = tl.arange(0, CR)[None, :, None] * CL + tl.arange(0, CL)[None, None, :]
    return ch


@triton.jit
def _pixels(x):
    """Per-pixel values [P] as a tap row's pixel axis."""
    if _TAPS_OUTER:
        y = x[None, :, None]
    else:
        y = x[:, None, None]
    return y


@triton.jit
def _reduce(acc):
    """A tap row [CR, P, CL] (or [P, CR, CL]) summed to [P]: registers, then the lanes of one warp."""
    if _TAPS_OUTER:
        s = tl.sum(tl.sum(acc, axis=2), axis=0)
    else:
        s = tl.sum(tl.sum(acc, axis=2), axis=1)
    return s


@triton.jit
def _unstack8(x):
    """[8, CR, P, CL] (or [P, 8, CR, CL]; taps in each lane's registers) -> its 8 tap rows, register
    renaming only."""
    if _TAPS_OUTER:
        x = tl.permute(x, (1, 2, 3, 0))
    else:
        x = tl.permute(x, (0, 2, 3, 1))
    S0: tl.constexpr = x.shape[0]
    S1: tl.constexpr = x.shape[1]
    S2: tl.constexpr = x.shape[2]
    a, b = tl.split(tl.reshape(x, (S0, S1, S2, 4, 2)))  # taps (0, 2, 4, 6), (1, 3, 5, 7)
    a0, a1 = tl.split(tl.reshape(a, (S0, S1, S2, 2, 2)))  # (0, 4), (2, 6)
    b0, b1 = tl.split(tl.reshape(b, (S0, S1, S2, 2, 2)))  # (1, 5), (3, 7)
    t0, t4 = tl.split(a0)
    t2, t6 = tl.split(a1)
    t1, t5 = tl.split(b0)
    t3, t7 = tl.split(b1)
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _patch(ptr, centre, ch, row, CP: tl.constexpr):
    """The 9 taps (raster order) of the 3x3 patches centred at element offsets centre [P] of a padded
    map, each a tap row [CR, P, CL] (:data:`_TAPS_OUTER`), from two unmasked gathers of whole tap rows."""
    # 64-bit offsets (one extension per patch): the tap and channel parts then fold into the loads'
    # immediate offsets, which sign-extended 32-bit element offsets would not allow.
    centre = _pixels(centre.to(tl.int64))
    ch = ch.to(tl.int64)
    row = row.to(tl.int64)
    t = tl.arange(0, 8)
    taps = (t // 3 - 1) * row + (t % 3 - 1) * CP  # [8] element offsets of taps 0-7
    if _TAPS_OUTER:
        first = tl.load(ptr + (taps[:, None, None, None] + (centre + ch)[None, :, :, :]))
    else:
        first = tl.load(ptr + (taps[None, :, None, None] + (centre + ch)[:, None, :, :]))
    t0, t1, t2, t3, t4, t5, t6, t7 = _unstack8(first)
    t8 = tl.load(ptr + ((centre + (row + CP)) + ch))
    return t0, t1, t2, t3, t4, t5, t6, t7, t8


@triton.jit
def _widen(x, PAIRS: tl.constexpr):
    """fp32 values of a tap row: (x, x) for fp32/fp16 values (x converted), (even, odd) channels for
    bf16 pairs held in int32 words (a bf16 is the top half of an fp32: one shift or mask each)."""
    if PAIRS:
        return (x << 16).to(tl.float32, bitcast=True), (x & -65536).to(tl.float32, bitcast=True)
    y = x.to(tl.float32)
    return y, y


@triton.jit
def _query_patch(ptr, centre, ch, row, CP: tl.constexpr, PAIRS: tl.constexpr):
    """The query patches in fp32, 18 tensors [CR, P, CL]: (even, odd) per tap for bf16 pairs, the tap
    twice otherwise (the second copy is never read: see :func:`_similarity`)."""
    t0, t1, t2, t3, t4, t5, t6, t7, t8 = _patch(ptr, centre, ch, row, CP)
    a0, b0 = _widen(t0, PAIRS)
    a1, b1 = _widen(t1, PAIRS)
    a2, b2 = _widen(t2, PAIRS)
    a3, b3 = _widen(t3, PAIRS)
    a4, b4 = _widen(t4, PAIRS)
    a5, b5 = _widen(t5, PAIRS)
    a6, b6 = _widen(t6, PAIRS)
    a7, b7 = _widen(t7, PAIRS)
    a8, b8 = _widen(t8, PAIRS)
    return a0, b0, a1, b1, a2, b2, a3, b3, a4, b4, a5, b5, a6, b6, a7, b7, a8, b8


@triton.jit
def _similarity(q, qn, ref_ptr, rnorm_ptr, cy, cx, Wr, ch, CP: tl.constexpr, PAIRS: tl.constexpr,
                WIDE: tl.constexpr):
    """Eq. 1: cosine of the query patches q (:func:`_query_patch`) and the reference patches centred at
    (cy, cx) [P]: 9 row gathers, fp32 multiply-adds chained per lane over the 9 taps, one reduction over
    the 9 x CP values, divided by the precomputed norms (0 if either is 0), clamped to [-1, 1]."""
    if WIDE:
        cy = cy.to(tl.int64)
        cx = cx.to(tl.int64)
    row = (Wr + 2) * CP
    r = _patch(ref_ptr, (cy + 1) * row + (cx + 1) * CP, ch, row, CP)
    acc = tl.zeros(r[8].shape, tl.float32)
    for t in tl.static_range(9):
        lo, hi = _widen(r[t], PAIRS)
        acc += q[2 * t] * lo
        if PAIRS:
            acc += q[2 * t + 1] * hi
    dot = _reduce(acc)
    rn = tl.load(rnorm_ptr + (cy * Wr + cx))
    den = qn * rn
    s = tl.where(den > 0, dot / tl.where(den > 0, den, 1.0), 0.0)
    return tl.minimum(tl.maximum(s, -1.0), 1.0)


@triton.jit
def _tile(query_ptr, qnorm_ptr, ref_meta_ptr, B, Hq, Wq,
          TH: tl.constexpr, TW: tl.constexpr, CR: tl.constexpr, CL: tl.constexpr, WIDE: tl.constexpr):
    """Set-up shared by the kernels: this program's TH x TW query pixels (clamped into the grid, so every
    load is in bounds; ``inb`` marks the real ones), their query patches and norms, the reference geometry
    and the int64 bases of this (batch, reference)."""
    CP: tl.constexpr = CR * CL
    PAIRS: tl.constexpr = query_ptr.dtype.element_ty == tl.int32
    tiles_x = tl.cdiv(Wq, TW)
    t = tl.program_id(0)
    b = tl.program_id(1)
    r = tl.program_id(2)
    p = tl.arange(0, TH * TW)
    py = (t // tiles_x) * TH + p // TW
    px = (t % tiles_x) * TW + p % TW
    inb = (py < Hq) & (px < Wq)
    qy = tl.minimum(py, Hq - 1)
    qx = tl.minimum(px, Wq - 1)
    if WIDE:
        qy = qy.to(tl.int64)
        qx = qx.to(tl.int64)
    qrow = (Wq + 2) * CP
    q_base = query_ptr + b.to(tl.int64) * (Hq + 2) * qrow
    ch = _channels(CR, CL)
    q = _query_patch(q_base, (qy + 1) * qrow + (qx + 1) * CP, ch, qrow, CP, PAIRS)
    qn = tl.load(qnorm_ptr + b.to(tl.int64) * Hq * Wq + (qy * Wq + qx))
    r_first = tl.load(ref_meta_ptr + 4 * r) * CP  # in elements of ref_ptr (words for bf16 pairs)
    n_first = tl.load(ref_meta_ptr + 4 * r + 1)
    Hr = tl.load(ref_meta_ptr + 4 * r + 2).to(tl.int32)
    Wr = tl.load(ref_meta_ptr + 4 * r + 3).to(tl.int32)
    r_plane = r_first + b.to(tl.int64) * ((Hr + 2).to(tl.int64) * (Wr + 2) * CP)
    n_plane = n_first + b.to(tl.int64) * (Hr * Wr)
    state = (r.to(tl.int64) * B + b) * Hq * Wq  # first pixel of (r, b) in pos / score
    return py, px, inb, q, qn, Hr, Wr, r_plane, n_plane, state, ch


@triton.jit
def _patch_score_kernel(
    query_ptr, qnorm_ptr, ref_ptr, rnorm_ptr, ref_meta_ptr, pos_ptr, score_ptr,
    B, Hq, Wq,
    TH: tl.constexpr, TW: tl.constexpr, CR: tl.constexpr, CL: tl.constexpr, WIDE: tl.constexpr,
):
    """Eq. 2: score[r, b, j] = r(j, pos[r, b, j]) for every query pixel j."""
    CP: tl.constexpr = CR * CL
    PAIRS: tl.constexpr = query_ptr.dtype.element_ty == tl.int32
    py, px, inb, q, qn, Hr, Wr, r_plane, n_plane, state, ch = _tile(
        query_ptr, qnorm_ptr, ref_meta_ptr, B, Hq, Wq, TH, TW, CR, CL, WIDE)
    st = state + (tl.minimum(py, Hq - 1) * Wq + tl.minimum(px, Wq - 1))
    cy = tl.load(pos_ptr + 2 * st).to(tl.int32)
    cx = tl.load(pos_ptr + 2 * st + 1).to(tl.int32)
    s = _similarity(q, qn, ref_ptr + r_plane, rnorm_ptr + n_plane, cy, cx, Wr, ch, CP, PAIRS, WIDE)
    tl.store(score_ptr + st, s, mask=inb)


@triton.jit
def _lr_candidate(d: tl.constexpr, pos_in_ptr, state, py, px, inb, Hq, Wq, Hr, Wr, k,
                  OFFSET_CORRECTED: tl.constexpr):
    """LR propagation (Eq. 3-5): the match of neighbour u = j + k*d (d the d-th of the 8 neighbours in
    raster order), whether u lies in the query grid, and the position clamped into the reference."""
    t: tl.constexpr = d + d // 4  # skip the centre
    dy: tl.constexpr = t // 3 - 1
    dx: tl.constexpr = t % 3 - 1
    uy = py + dy * k
    ux = px + dx * k
    ok = inb & (uy >= 0) & (uy < Hq) & (ux >= 0) & (ux < Wq)
    su = state + (tl.minimum(tl.maximum(uy, 0), Hq - 1) * Wq + tl.minimum(tl.maximum(ux, 0), Wq - 1))
    cy = tl.load(pos_in_ptr + 2 * su).to(tl.int32)
    cx = tl.load(pos_in_ptr + 2 * su + 1).to(tl.int32)
    if OFFSET_CORRECTED:
        cy = cy - dy * k
        cx = cx - dx * k
    return ok, tl.minimum(tl.maximum(cy, 0), Hr - 1), tl.minimum(tl.maximum(cx, 0), Wr - 1)


@triton.jit
def _ref_candidate(d: tl.constexpr, oy, ox, k, Hr, Wr):
    """Ref propagation: the d-th neighbour (raster order) of the own match at distance k, clamped."""
    t: tl.constexpr = d + d // 4
    cy = tl.minimum(tl.maximum(oy + (t // 3 - 1) * k, 0), Hr - 1)
    cx = tl.minimum(tl.maximum(ox + (t % 3 - 1) * k, 0), Wr - 1)
    return cy, cx


@triton.jit
def _keep_better(ok, s, cy, cx, bs, by, bx):
    """Argmax update: a valid candidate replaces the current best only if strictly better."""
    better = ok & (s > bs)
    return tl.where(better, s, bs), tl.where(better, cy, by), tl.where(better, cx, bx)


@triton.jit
def _patchmatch_step_kernel(
    query_ptr, qnorm_ptr, ref_ptr, rnorm_ptr, ref_meta_ptr,
    pos_in_ptr, score_in_ptr, pos_out_ptr, score_out_ptr,
    B, Hq, Wq, k,
    OFFSET_CORRECTED: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, CR: tl.constexpr,
    CL: tl.constexpr, WIDE: tl.constexpr,
):
    """One propagation step at dilation k for every query pixel j (Eq. 3-5, then Ref propagation):

    LR propagation: candidates pos_in[u] for the 8 neighbours u = j + k*d inside the query grid
    (OFFSET_CORRECTED: pos_in[u] - k*d), clamped to the reference; Ref propagation: best + k*d, clamped.
    A candidate replaces the current best only if strictly better (ties keep the earlier one). The 16
    candidates are unrolled: the 8 LR candidates are independent, so their gathers overlap."""
    CP: tl.constexpr = CR * CL
    PAIRS: tl.constexpr = query_ptr.dtype.element_ty == tl.int32
    py, px, inb, q, qn, Hr, Wr, r_plane, n_plane, state, ch = _tile(
        query_ptr, qnorm_ptr, ref_meta_ptr, B, Hq, Wq, TH, TW, CR, CL, WIDE)
    r_ptr = ref_ptr + r_plane
    n_ptr = rnorm_ptr + n_plane
    st = state + (tl.minimum(py, Hq - 1) * Wq + tl.minimum(px, Wq - 1))
    by = tl.load(pos_in_ptr + 2 * st).to(tl.int32)
    bx = tl.load(pos_in_ptr + 2 * st + 1).to(tl.int32)
    bs = tl.load(score_in_ptr + st)
    for d in tl.static_range(8):
        ok, cy, cx = _lr_candidate(d, pos_in_ptr, state, py, px, inb, Hq, Wq, Hr, Wr, k, OFFSET_CORRECTED)
        s = _similarity(q, qn, r_ptr, n_ptr, cy, cx, Wr, ch, CP, PAIRS, WIDE)
        bs, by, bx = _keep_better(ok, s, cy, cx, bs, by, bx)
    oy = by
    ox = bx
    for d in tl.static_range(8):
        cy, cx = _ref_candidate(d, oy, ox, k, Hr, Wr)
        s = _similarity(q, qn, r_ptr, n_ptr, cy, cx, Wr, ch, CP, PAIRS, WIDE)
        bs, by, bx = _keep_better(inb, s, cy, cx, bs, by, bx)
    tl.store(pos_out_ptr + 2 * st, by.to(tl.int64), mask=inb)
    tl.store(pos_out_ptr + 2 * st + 1, bx.to(tl.int64), mask=inb)
    tl.store(score_out_ptr + st, bs, mask=inb)


def launch_config(Hq: int, Wq: int, words: int, elem: int, pairs: bool, n_planes: int, wide: bool) -> dict:
    """Tile and warps of a level whose maps hold ``words`` values of ``elem`` bytes per pixel (``pairs``:
    int32 words of two bf16 channels). About 8 fp32 channel values per lane and tap, so the query patch
    takes 72 registers per lane (a pixel per warp at C = 256); 4 warps per program (at ~140 registers,
    three programs per multiprocessor: 12 resident warps, against 8 for one 8-warp program), 2 where the
    level has too few tiles to give every multiprocessor two programs (the coarse levels). The
    interpreter runs programs one by one in NumPy: there one large tile."""
    lay = PaddedLayout(words, elem)
    channels = lay.CP * (2 if pairs else 1)
    if INTERPRET:
        th, tw, warps = min(16, triton.next_power_of_2(Hq)), min(32, triton.next_power_of_2(Wq)), 4
    else:
        for warps in (4, 2):
            p = max(1, 256 * warps // channels)  # pixels per tile
            th = 1 << ((p.bit_length() - 1) // 2)
            tw = p // th
            if triton.cdiv(Hq, th) * triton.cdiv(Wq, tw) * n_planes >= 2 * _SMS:
                break
    return dict(TH=th, TW=tw, CR=lay.CR, CL=lay.CL, WIDE=int(wide), num_warps=warps)


def _words(x: torch.Tensor) -> torch.Tensor:
    """bf16 maps are read as int32 words of two channels (widened to fp32 by a shift or a mask)."""
    return x.view(torch.int32) if x.dtype == torch.bfloat16 else x


def _config(query: torch.Tensor, ref: torch.Tensor, n_planes: int, Hq: int, Wq: int) -> dict:
    """Launch configuration for maps already in the kernels' layout (``query.shape[-1]`` is CP, and
    PaddedLayout of CP is CP). int32 offsets within a (batch, reference) plane, unless the maps are too
    big for that (judged on the whole reference tensor: no device sync)."""
    wide = max(query[0].numel(), ref.numel()) > _INT32_MAX
    pairs = query.dtype == torch.int32
    return launch_config(Hq, Wq, query.shape[-1], query.element_size(), pairs, n_planes, wide)


def _grid(B: int, Hq: int, Wq: int, R: int, cfg: dict):
    return (triton.cdiv(Hq, cfg["TH"]) * triton.cdiv(Wq, cfg["TW"]), B, R)


@torch.library.triton_op("amsa::patch_score", mutates_args=())
def patch_score(
    query: torch.Tensor, qnorm: torch.Tensor, ref: torch.Tensor, rnorm: torch.Tensor,
    ref_meta: torch.Tensor, pos: torch.Tensor,
) -> torch.Tensor:
    """Scores [R, B, Hq, Wq] of positions [R, B, Hq, Wq, 2] (layouts in the module docstring)."""
    R, B, Hq, Wq, _ = pos.shape
    score = alloc((R, B, Hq, Wq), torch.float32, pos.device)
    query, ref = _words(query), _words(ref)
    cfg = _config(query, ref, R * B, Hq, Wq)
    torch.library.wrap_triton(_patch_score_kernel)[_grid(B, Hq, Wq, R, cfg)](
        query, qnorm, ref, rnorm, ref_meta, pos, score, B, Hq, Wq, **cfg)
    return score


@torch.library.triton_op("amsa::patchmatch_step", mutates_args=())
def patchmatch_step(
    query: torch.Tensor, qnorm: torch.Tensor, ref: torch.Tensor, rnorm: torch.Tensor,
    ref_meta: torch.Tensor, pos: torch.Tensor, score: torch.Tensor, dilation: int, offset_corrected: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused propagation step at ``dilation`` for all references: new (pos, score)."""
    R, B, Hq, Wq, _ = pos.shape
    pos_out, score_out = alloc_like(pos), alloc_like(score)
    query, ref = _words(query), _words(ref)
    cfg = _config(query, ref, R * B, Hq, Wq)
    torch.library.wrap_triton(_patchmatch_step_kernel)[_grid(B, Hq, Wq, R, cfg)](
        query, qnorm, ref, rnorm, ref_meta, pos, score, pos_out, score_out, B, Hq, Wq, dilation,
        OFFSET_CORRECTED=offset_corrected, **cfg)
    return pos_out, score_out
