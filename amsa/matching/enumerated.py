"""Enumerated matching (the exact baseline): the argmax of Eq. 1 over every reference patch.

:func:`enumerated_match` runs on every device in PyTorch (chunked matmuls of normalised patch rows);
:func:`matmul_argmax` is the fused form on Triton (``kernels/enumerated.py``: tile products and a running
max/argmax in registers, the score matrix never reaching memory), the strong baseline of the benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amsa._checks import (
    as_list,
    check_dtype,
    check_matching,
    check_same,
    check_tensor,
)
from amsa.backends import TRITON_DTYPES, choose_backend
from amsa.matching.schedule import enumerated_flops
from amsa.matching.torch_backend import normalise_rows, unfold_normalised
from amsa.matching.types import Match

__all__ = ["enumerated_match", "matmul_argmax"]

# Candidates per query patch that the bf16 mode of enumerated matching re-scores in fp32.
RESCORE_TOP = 8


def enumerated_match(query: torch.Tensor, ref, *, chunk: int | None = None, precision: str = "fp32"):
    """Exact matching: argmax of Eq. 1 over every reference patch (the enumerated baseline).

    Chunks of normalised query patches are multiplied with all normalised reference patches and the row
    argmax kept: memory O(chunk * Nr + 9 * Nr * C), never the Nq x Nr matrix. Ties keep the lowest flat
    reference index. ``ref`` may be a list; the result is then a list. FLOPs: 2 * 9C * Nq * Nr.

    ``precision="bf16"`` runs the products in bf16 (tensor cores on GPU, AMX on recent CPUs), re-scores
    the 8 best candidates of every query patch exactly in fp32 and keeps the best: exact whenever the true
    optimum is among the bf16 top 8, which bf16's ~3 significant digits make likely, not certain."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    refs, _, many = check_matching(query, ref)
    out = [_enumerated_one(query, r, chunk, precision) for r in refs]
    return out if many else out[0]


@torch.no_grad()
def _enumerated_one(query: torch.Tensor, ref: torch.Tensor, chunk: int | None, precision: str) -> Match:
    B, C, hq, wq = query.shape
    hr, wr = ref.shape[-2:]
    Nr = hr * wr
    if chunk is None:  # query rows per matmul: keep the [chunk, Nr] score block near 64 MB
        chunk = max(16, min(hq * wq, (16 << 20) // Nr))
    pos = torch.empty(B, hq * wq, dtype=torch.int64, device=query.device)
    score = torch.empty(B, hq * wq, dtype=torch.float32, device=query.device)
    rn = unfold_normalised(ref)  # [B, Nr, 9C]
    rn_low = rn.to(torch.bfloat16) if precision == "bf16" else None
    for b in range(B):
        qb = query[b : b + 1]
        for i in range(0, hq * wq, chunk):
            qn = _unfold_rows(qb, i, min(i + chunk, hq * wq))
            if rn_low is None:
                s, j = (qn @ rn[b].T).clamp_(-1.0, 1.0).max(1)
            else:
                top = (qn.to(torch.bfloat16) @ rn_low[b].T).topk(min(RESCORE_TOP, Nr), dim=1).indices
                exact = torch.bmm(rn[b][top], qn[:, :, None])[..., 0].clamp_(-1.0, 1.0)  # [n, top]
                s = exact.max(1, keepdim=True).values
                j = torch.where(exact == s, top, Nr).min(1).values  # ties: lowest flat index
                s = s[:, 0]
            score[b, i : i + chunk], pos[b, i : i + chunk] = s, j
    pos = torch.stack([pos // wr, pos % wr], dim=-1).view(B, hq, wq, 2)
    return Match(pos, score.view(B, hq, wq), enumerated_flops(B, C, (hq, wq), [(hr, wr)]))


def _unfold_rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Normalised 3x3 patch vectors of flat pixels [start, stop) of x [1, C, h, w] -> [stop-start, 9C]."""
    h, w = x.shape[-2:]
    y0, y1 = start // w, (stop - 1) // w + 1  # rows covering the chunk, plus the 1-pixel halo
    band = F.pad(x.float(), (0, 0, 1, 1))[..., y0 : y1 + 2, :]
    u = F.unfold(band, 3, padding=(0, 1)).transpose(1, 2)[0]  # [(y1-y0)*w, 9C]
    return normalise_rows(u[start - y0 * w : stop - y0 * w])


def _check_rows(x, name: str) -> None:
    check_tensor(x, name, 3, "[B, N, D]")
    check_dtype(x, name, TRITON_DTYPES, "float32, float16 or bfloat16")
    if 0 in x.shape:
        raise ValueError(f"{name} must have B, N and D > 0, got shape {tuple(x.shape)}")


def matmul_argmax(q_rows: torch.Tensor, r_rows, *, tf32: bool = False):
    """Row-wise max and argmax of ``q_rows @ r_rows^T`` in one fused kernel, never forming the product.

    Args:
        q_rows: [B, Nq, D] query rows (float32, float16 or bfloat16; any strides).
        r_rows: [B, Nr, D] reference rows of the same dtype, batch and D, or a list of them (any Nr each):
            all are matched in one launch.
        tf32: float32 rows multiply on TF32 tensor cores instead of exactly (float32 rows only).

    Returns ``(best, idx)``: best float32 [B, Nq], the maximum accumulated in fp32; idx int64 [B, Nq],
    the lowest reference row index reaching it (ties and near-ties: module docstring). A list of
    references gives a list of such pairs. Runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1.
    """
    refs, names, many = as_list(r_rows, "r_rows")
    _check_rows(q_rows, "q_rows")
    B, Nq, D = q_rows.shape
    for r, name in zip(refs, names):
        _check_rows(r, name)
        check_same(r, name, q_rows, "q_rows")
        if r.shape[0] != B or r.shape[2] != D:
            raise ValueError(f"{name} has shape {tuple(r.shape)} but q_rows has {tuple(q_rows.shape)}: "
                             "batch B and row length D must agree")
    if tf32 and q_rows.dtype != torch.float32:
        raise ValueError(f"tf32=True applies to float32 rows, got {q_rows.dtype}")
    choose_backend("triton", q_rows.device, q_rows.dtype, "matmul_argmax")
    from kernels.enumerated import MAX_GRID_YZ, matmul_argmax_op  # imported lazily: triton only here

    if B > MAX_GRID_YZ or len(refs) > MAX_GRID_YZ:
        raise ValueError(f"batch ({B}) and number of references ({len(refs)}) must be <= {MAX_GRID_YZ}")
    sizes = [r.shape[1] for r in refs]
    first = [sum(sizes[:i]) for i in range(len(refs))]
    meta = torch.tensor(list(zip(first, sizes)), dtype=torch.int64, device=q_rows.device)
    r = refs[0] if len(refs) == 1 else torch.cat(refs, dim=1)  # one reference: read in place
    best, idx = matmul_argmax_op(q_rows, r, meta, len(refs), int(not tf32))
    out = list(zip(best.unbind(0), idx.unbind(0)))
    return out if many else out[0]
