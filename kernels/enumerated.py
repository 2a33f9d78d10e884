"""Enumerated matching as one fused Triton kernel: row-wise max and argmax of ``Q @ R^T`` without the
Nq x Nr matrix (the strong baseline of issue 5; ``bench.baselines.matmul_argmax_fused`` feeds it the
normalised 3x3 patch rows of Eq. 1, D = 9C).

    best[r, b, i] = max_j  <Q[b, i, :], R_r[b, j, :]>          idx[r, b, i] = the lowest such j

Flash-attention-like: a program owns BLOCK_M query rows of one (batch b, reference r), loops over the
reference in blocks of BLOCK_N rows, accumulates each BLOCK_M x BLOCK_N tile with ``tl.dot`` over D in
BLOCK_K chunks (fp32 accumulation) and folds it into a running (max, argmax) kept in registers.

Precision: bf16/fp16 rows multiply exactly (the products fit fp32) and accumulate in fp32; fp32 rows use
exact fp32 products, or TF32 tensor cores with ``tf32=True``. Under TRITON_INTERPRET=1 every product is
an exact fp32 product (TF32 is not emulated).

Ties: the argmax is the lowest reference index among the entries whose fp32 accumulated score is the
maximum (within a tile the lowest column wins; a later tile replaces the running best only if strictly
greater). Two scores that are equal in exact arithmetic may still round differently in fp32 when the
summation order differs, so against a float64 reference the argmax is exact up to such near-ties: rows
whose best candidates lie within the fp32 accumulation error (a few ulp of 1 for unit rows).

Layouts: the kernel reads row-major rows, [B, N, DP] with unit stride along the row and DP a multiple
of 16, so that every operand load is a 16-byte vector; :func:`row_major` gives rows of any other layout
that form (one copy, the row zero-padded to DP: zeros add nothing to a product), and rows already in it
are read in place. Several references are concatenated along the row axis, and ``ref_meta`` int64
[R, 2] holds the (first row, Nr) of each. The grid is (query blocks, B, R): all references in one
launch. Pointer offsets are int64. NaN/Inf rows give unspecified results (callers check, as
``bench.baselines`` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import INTERPRET, alloc, dot

# CUDA grid limit of the batch and reference axes.
MAX_GRID_YZ = 65535


def _configs() -> list[triton.Config]:
    """Tile shapes for sm_90 (bf16: 64-wide K chunks; fp32 operands: 32-wide, twice the bytes). The
    interpreter runs programs one by one in NumPy: one small config, so that tiny test shapes still span
    several blocks on every axis."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
        for bm, bn, bk, nw, ns in [
            (128, 128, 64, 8, 3),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 128, 32, 8, 4),
            (64, 64, 32, 4, 4),
        ]
    ]


@triton.autotune(configs=_configs(), key=["D", "IEEE"])
@triton.jit
def _matmul_argmax_kernel(
    q_ptr, r_ptr, ref_meta_ptr, best_ptr, idx_ptr,
    B, Nq, D,
    stride_qb, stride_qm, stride_rb, stride_rn,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """best[r, b, i] = max_j Q[b, i] . R_r[b, j] (fp32), idx[r, b, i] = lowest argmax j (int64).

    q [B, Nq, D], r [B, sum_r Nr_r, D] (strided), ref_meta int64 [R, 2] = (first row, Nr) of reference r,
    best fp32 / idx int64 [R, B, Nq] contiguous. IEEE: fp32 operands multiply exactly (1) or in TF32 (0).
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2).to(tl.int64)
    first = tl.load(ref_meta_ptr + 2 * r)
    Nr = tl.load(ref_meta_ptr + 2 * r + 1).to(tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < Nq
    q_rows = q_ptr + b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_qm  # [BLOCK_M, 1]
    r_base = r_ptr + b * stride_rb + first * stride_rn
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n0 in range(0, Nr, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < Nr
        r_rows = r_base + cols.to(tl.int64)[:, None] * stride_rn  # [BLOCK_N, 1]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            k_ok = (ks < D)[None, :]
            q = tl.load(q_rows + ks[None, :], mask=m_ok[:, None] & k_ok, other=0.0)
            rt = tl.load(r_rows + ks[None, :], mask=n_ok[:, None] & k_ok, other=0.0)
            acc = dot(q, tl.trans(rt), acc, IEEE)
        s = tl.where(n_ok[None, :], acc, float("-inf"))
        tile_max = tl.max(s, axis=1)
        # Lowest column holding the tile's maximum (explicit, rather than relying on argmax tie rules).
        tile_arg = tl.min(tl.where(s == tile_max[:, None], cols[None, :], Nr), axis=1)
        better = tile_max > best  # strictly: an earlier tile keeps ties, so the lowest index wins
        best = tl.where(better, tile_max, best)
        arg = tl.where(better, tile_arg, arg)
    out = (r * B + b) * Nq + offs_m
    tl.store(best_ptr + out, best, mask=m_ok)
    tl.store(idx_ptr + out, arg.to(tl.int64), mask=m_ok)


def _vector_rows(x: torch.Tensor) -> bool:
    """Rows [B, N, D] that the kernel reads with 16-byte vectors in place: unit stride along the row,
    row and batch strides (and the data pointer) multiples of 16 elements."""
    return x.stride(2) == 1 and x.stride(1) % 16 == 0 and x.stride(0) % 16 == 0 and (
        x.data_ptr() % (16 * x.element_size()) == 0)


def row_major(x: torch.Tensor, dp: int) -> torch.Tensor:
    """Rows [B, N, D] as the kernel reads them: ``x`` itself if it is already row-major with D = dp and
    vector-aligned strides, else a zero-padded row-major copy [B, N, dp]."""
    if x.shape[2] == dp and _vector_rows(x):
        return x
    out = x.new_zeros(x.shape[0], x.shape[1], dp)
    out[..., : x.shape[2]] = x
    return out


@torch.library.triton_op("amsa::matmul_argmax", mutates_args=())
def matmul_argmax_op(
    q: torch.Tensor, r: torch.Tensor, ref_meta: torch.Tensor, n_refs: int, ieee: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(best fp32, idx int64), each [R, B, Nq], for q [B, Nq, D] against the R references held in
    r [B, sum Nr, D] as described by ref_meta [R, 2] (module docstring). Inputs are not checked here;
    rows of another layout than the kernel's are copied into it (:func:`row_major`)."""
    B, Nq, D = q.shape
    dp = triton.cdiv(D, 16) * 16
    q, r = row_major(q, dp), row_major(r, dp)
    best = alloc((n_refs, B, Nq), torch.float32, q.device)
    idx = alloc((n_refs, B, Nq), torch.int64, q.device)

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B, n_refs)

    torch.library.wrap_triton(_matmul_argmax_kernel)[grid](
        q, r, ref_meta, best, idx, B, Nq, dp, q.stride(0), q.stride(1), r.stride(0), r.stride(1),
        IEEE=ieee)
    return best, idx
