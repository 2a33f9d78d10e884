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

Two backends compute the same algorithm: PyTorch (chunked gathers, memory O(N*C)) and Triton
(``kernels/patchmatch.py``: one fused launch per step for all references). Positions agree between the
two up to near-ties: candidates whose scores differ by a few ulp, where the backends' summation orders
(and the compiled kernel's division) can round differently.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# The 8 neighbours d of a pixel (dy, dx), in the order candidates are tried (ties keep the earlier one).
NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
# The 9 taps of a 3x3 patch.
TAPS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
# Candidates evaluated per query pixel in one propagation step: 8 (LR) + 8 (Ref); the own match is reused.
CANDIDATES_PER_STEP = 2 * len(NEIGHBOURS)


# ----------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Snapshot:
    """State after ``iteration`` iterations on ``level`` (0 = coarsest); iteration 0 is the state on
    entering the level (random/given init, or the coarser level's result passed up).

    pos: int64 [B, h, w, 2] (y, x) in the level's reference pixels; score: float32 [B, h, w];
    flops: cumulative analytic FLOPs of the run up to this snapshot."""

    level: int
    iteration: int
    pos: torch.Tensor
    score: torch.Tensor
    flops: int
    query_size: tuple[int, int]
    ref_size: tuple[int, int]


@dataclass
class Match:
    """Correspondences of every query pixel in one reference map.

    pos: int64 [B, Hq, Wq, 2], (y, x) of the matched patch centre in reference pixels (H_i in the paper);
    score: float32 [B, Hq, Wq] (float64 for float64 features), cosine similarity of the two 3x3 patches,
    in [-1, 1] (S_i);
    flops: analytic FLOPs spent (multiply-adds count 2); history: per-iteration snapshots or None."""

    pos: torch.Tensor
    score: torch.Tensor
    flops: int = 0
    history: list[Snapshot] | None = field(default=None, repr=False)


class Pyramid(tuple):
    """Explicit feature pyramid, coarse to fine: ``Pyramid([f_1/8, f_1/4, f_1/2, f_1])``, each [B, C, h, w].

    Pass one instead of a tensor to ``cfe_patchmatch`` to use your own coarse levels (the official release
    runs the feature extractor on downsampled images) instead of area-downsampled features."""

    def __new__(cls, levels: Sequence[torch.Tensor]):
        levels = tuple(levels)
        if not levels:
            raise ValueError("Pyramid needs at least one level")
        return super().__new__(cls, levels)


# ----------------------------------------------------------------------------------------------------------
# Input checks


def _check_features(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64 for checks), got {x.dtype}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64 for checks), got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have batch and channels > 0, got shape {tuple(x.shape)}")
    if x.shape[2] < 3 or x.shape[3] < 3:
        raise ValueError(f"{name} must be at least 3x3 (one 3x3 patch), got {tuple(x.shape[2:])}")


def _check_finite(x: torch.Tensor, name: str) -> None:
    """NaN/Inf features raise: the cosine of such patches is undefined. The check syncs the device once per
    call; under torch.compile it is skipped, and matches of patches that touch NaN/Inf are unspecified."""
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} contains NaN or Inf; cosine similarity is undefined for such patches "
            "(replace them, e.g. with torch.nan_to_num, before matching)"
        )


def _check_pair(query: torch.Tensor, ref: torch.Tensor, qname: str, rname: str) -> None:
    if ref.shape[0] != query.shape[0]:
        raise ValueError(f"{rname} has batch {ref.shape[0]} but {qname} has batch {query.shape[0]}")
    if ref.shape[1] != query.shape[1]:
        raise ValueError(f"{rname} has {ref.shape[1]} channels but {qname} has {query.shape[1]}")
    if ref.device != query.device:
        raise ValueError(f"{rname} is on {ref.device} but {qname} is on {query.device}")
    if ref.dtype != query.dtype:
        raise TypeError(f"{rname} is {ref.dtype} but {qname} is {query.dtype}; use one dtype")


def _check_iters(iters) -> tuple[int, ...]:
    if isinstance(iters, int) or not isinstance(iters, Sequence):
        raise TypeError(f"iters must be a sequence of per-level iteration counts, got {iters!r}")
    iters = tuple(iters)
    if not iters:
        raise ValueError("iters must not be empty: give one iteration count per level, coarse to fine")
    for n in iters:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"iters must hold non-negative ints, got {iters!r}")
    return iters


def _check_positions(pos, name: str, batch: int, size: tuple[int, int], ref_size: tuple[int, int], device):
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pos).__name__}")
    if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {pos.dtype}")
    want = (batch, *size, 2)
    if tuple(pos.shape) != want:
        raise ValueError(f"{name} must have shape [B, Hq, Wq, 2] = {list(want)}, got {list(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device} but the features are on {device}")
    if not torch.compiler.is_compiling():
        y, x = pos[..., 0], pos[..., 1]
        if bool((y < 0).any() | (y >= ref_size[0]).any() | (x < 0).any() | (x >= ref_size[1]).any()):
            raise ValueError(f"{name} holds positions outside the reference grid {list(ref_size)}")


def _levels(x, n_levels: int, name: str) -> list[torch.Tensor]:
    """Feature maps of the ``n_levels`` levels, coarse to fine: area downsampling by 2^l (floor sizes),
    or the caller's explicit :class:`Pyramid`."""
    if isinstance(x, Pyramid):
        if len(x) != n_levels:
            raise ValueError(f"{name} is a Pyramid of {len(x)} levels but iters has {n_levels}")
        for i, lv in enumerate(x):
            _check_features(lv, f"{name}[{i}]")
            _check_pair(x[-1], lv, f"{name}[-1]", f"{name}[{i}]")
        return list(x)
    _check_features(x, name)
    H, W = x.shape[-2:]
    f = 2 ** (n_levels - 1)
    if H // f < 3 or W // f < 3:
        raise ValueError(
            f"{name} is {H}x{W}, too small for {n_levels} levels: the coarsest level (1/{f}) must be at "
            f"least 3x3, i.e. the map at least {3 * f}x{3 * f}"
        )
    levels = [x]
    for lv in range(1, n_levels):
        levels.append(F.interpolate(x, size=(H // 2**lv, W // 2**lv), mode="area"))
    return levels[::-1]


# ----------------------------------------------------------------------------------------------------------
# Schedule, initialisation, passing positions up a level


def dilations(query_size: tuple[int, int]) -> list[int]:
    """Dilations 2^t, t = 0..T-1, of one iteration on a level whose query map is ``query_size``:
    T = max(1, floor(log2(min(h, w) / 8))) (paper, Fig. 3: t = 0 .. log2(sqrt(N) / 8) - 1, rounded down)."""
    T = max(1, math.floor(math.log2(min(query_size) / 8)))
    return [2**t for t in range(T)]


@torch.library.custom_op("amsa::random_positions", mutates_args=())
def _random_positions(
    hq: int, wq: int, hr: int, wr: int, seed: int, device: torch.device
) -> torch.Tensor:
    """[hq, wq, 2] int64 uniform random (y, x) in an hr x wr grid, from a seeded CPU torch.Generator:
    the same on every device and independent of the batch (an opaque op, so torch.compile traces it)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    y = torch.randint(0, hr, (hq, wq), generator=g)
    x = torch.randint(0, wr, (hq, wq), generator=g)
    return torch.stack([y, x], dim=-1).to(device)


@_random_positions.register_fake
def _(hq, wq, hr, wr, seed, device):
    return torch.empty(hq, wq, 2, dtype=torch.int64, device=device)


def upsample_positions(
    pos: torch.Tensor,
    ref_size_from: tuple[int, int],
    ref_size_to: tuple[int, int],
    query_size_to: tuple[int, int],
) -> torch.Tensor:
    """Pass positions [B, h, w, 2] of a coarse level up to a finer one: [B, H, W, 2].

    Each fine query pixel takes the match of the coarse pixel whose cell contains its centre, displaced by
    its sub-cell offset and scaled to the fine reference grid, with pixel centres aligned:
    y_fine = floor((y_coarse + 0.5 + dy) * Hr / hr). An exact 2x translation stays exact."""
    B, h, w, _ = pos.shape
    H, W = query_size_to
    dev = pos.device
    fy = (torch.arange(H, device=dev, dtype=torch.float64) + 0.5) * (h / H)  # fine centres in coarse units
    fx = (torch.arange(W, device=dev, dtype=torch.float64) + 0.5) * (w / W)
    py, px = fy.floor().long().clamp_(0, h - 1), fx.floor().long().clamp_(0, w - 1)
    parent = pos[:, py][:, :, px].to(torch.float64)  # [B, H, W, 2]
    sub_y = (fy - (py + 0.5))[:, None]
    sub_x = (fx - (px + 0.5))[None, :]
    sy, sx = ref_size_to[0] / ref_size_from[0], ref_size_to[1] / ref_size_from[1]
    y = torch.floor((parent[..., 0] + 0.5 + sub_y) * sy).clamp_(0, ref_size_to[0] - 1)
    x = torch.floor((parent[..., 1] + 0.5 + sub_x) * sx).clamp_(0, ref_size_to[1] - 1)
    return torch.stack([y, x], dim=-1).to(pos.dtype)


# ----------------------------------------------------------------------------------------------------------
# PyTorch path. Maps are kept zero-padded by one pixel and flattened channels-last, [B*(h+2)*(w+2), C], so a
# patch tap is a row gather and out-of-grid taps read zeros (the paper's zero padding).


def _pad_flat(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> zero-padded channels-last rows [B*(h+2)*(w+2), C]."""
    return F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous().view(-1, x.shape[1])


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 features (reference checks and gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def patch_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_j|| of every 3x3 patch (zero padding), accumulated in fp32: [B, C, h, w] -> [B, h, w]."""
    sq = x.to(_acc_dtype(x)).square().sum(1, keepdim=True)
    return (F.avg_pool2d(sq, 3, stride=1, padding=1, count_include_pad=True) * 9).clamp_min(0).sqrt()[:, 0]


class _TorchLevel:
    """One level's maps prepared for the PyTorch path: padded rows, patch norms, flat index helpers."""

    def __init__(self, query: torch.Tensor, ref: torch.Tensor):
        B, C, hq, wq = query.shape
        self.B, self.C = B, C
        self.qsize, self.rsize = (hq, wq), tuple(ref.shape[-2:])
        hr, wr = self.rsize
        acc = _acc_dtype(query)
        self.qrows, self.rrows = _pad_flat(query.to(acc)), _pad_flat(ref.to(acc))
        self.qnorm = F.pad(patch_norms(query), (1, 1, 1, 1)).reshape(-1)
        self.rnorm = F.pad(patch_norms(ref), (1, 1, 1, 1)).reshape(-1)
        self.qtaps = torch.tensor([dy * (wq + 2) + dx for dy, dx in TAPS], device=query.device)
        self.rtaps = torch.tensor([dy * (wr + 2) + dx for dy, dx in TAPS], device=query.device)
        b = torch.arange(B, device=query.device)[:, None, None]
        y = torch.arange(hq, device=query.device)[None, :, None]
        x = torch.arange(wq, device=query.device)[None, None, :]
        self.qcentre = ((b * (hq + 2) + y + 1) * (wq + 2) + x + 1).reshape(-1)  # [B*hq*wq]
        self.batch = torch.arange(B, device=query.device).repeat_interleave(hq * wq)  # [B*hq*wq]
        # Query pixels per gather: ~8 MB of candidate rows (fp32). Measured on 2 cores at 256x256, C=64:
        # 2 MB chunks are 20 % slower (per-op overhead), 64 MB ones twice as slow (cache).
        self.chunk = max(64, (1 << 21) // (len(NEIGHBOURS) * 9 * C))
        # Reused gather buffers: fresh multi-MB allocations cost page faults on every chunk (about half the
        # time on CPU). Not when a gradient is wanted (patch_similarity), since out= ops do not record one.
        needs_grad = torch.is_grad_enabled() and (query.requires_grad or ref.requires_grad)
        self.work = None if needs_grad else (
            torch.empty(self.chunk * 9, C, dtype=acc, device=query.device),
            torch.empty(self.chunk * len(NEIGHBOURS) * 9, C, dtype=acc, device=query.device),
        )

    def ref_rows(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Flat padded-row index of reference pixels (y, x) given as [B*hq*wq, m] tensors."""
        hr, wr = self.rsize
        return (self.batch[:, None] * (hr + 2) + y + 1) * (wr + 2) + x + 1

    def scores(self, rcentre: torch.Tensor) -> torch.Tensor:
        """Eq. 1 for every query pixel against candidate rows [B*hq*wq, m] -> [B*hq*wq, m], in [-1, 1].

        Only the gathers and the inner products run in chunks (memory O(chunk * m * 9C)); the rest is
        vectorised over the level."""
        N, m = rcentre.shape
        dots = []
        for i in range(0, N, self.chunk):
            qc, rc = self.qcentre[i : i + self.chunk], rcentre[i : i + self.chunk]
            n = qc.numel()
            qi = (qc[:, None] + self.qtaps).view(-1)
            ri = (rc[..., None] + self.rtaps).view(-1)
            if self.work is None:
                q, r = self.qrows.index_select(0, qi), self.rrows.index_select(0, ri)
            else:
                q = torch.index_select(self.qrows, 0, qi, out=self.work[0][: qi.numel()])
                r = torch.index_select(self.rrows, 0, ri, out=self.work[1][: ri.numel()])
            dots.append(torch.bmm(r.view(n, m, -1), q.view(n, -1, 1)).view(n, m))
        dot = torch.cat(dots)
        den = self.qnorm[self.qcentre][:, None] * self.rnorm[rcentre]
        safe = torch.where(den > 0, den, torch.ones_like(den))  # exact division, also for tiny norms
        return torch.where(den > 0, dot / safe, torch.zeros_like(dot)).clamp(-1.0, 1.0)

    def score_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Eq. 2: scores of positions [B, hq, wq, 2] -> [B, hq, wq]."""
        rows = self.ref_rows(pos[..., 0].reshape(-1, 1), pos[..., 1].reshape(-1, 1))
        return self.scores(rows).view(pos.shape[:-1])

    def step(self, pos: torch.Tensor, score: torch.Tensor, k: int, offset_corrected: bool):
        """One propagation step at dilation k (LR then Ref propagation); returns new (pos, score)."""
        hq, wq = self.qsize
        hr, wr = self.rsize
        m = len(NEIGHBOURS)
        d = torch.tensor(NEIGHBOURS, device=pos.device) * k  # [8, 2]
        # LR propagation candidates: the neighbours' matches (offset-corrected: minus the displacement).
        big = max(hq, wq) * k + 1
        padded = F.pad(pos.permute(0, 3, 1, 2), (k, k, k, k), value=-big)  # sentinel: outside the grid
        cand = torch.stack([padded[:, :, k + k * dy : k + k * dy + hq, k + k * dx : k + k * dx + wq]
                            for dy, dx in NEIGHBOURS], dim=-1)  # [B, 2, hq, wq, 8]
        valid = (cand[:, 0] > -big).reshape(-1, m)
        cy, cx = cand[:, 0].reshape(-1, m), cand[:, 1].reshape(-1, m)
        if offset_corrected:
            cy, cx = cy - d[:, 0], cx - d[:, 1]
        cy, cx = cy.clamp(0, hr - 1), cx.clamp(0, wr - 1)
        s = torch.where(valid, self.scores(self.ref_rows(cy, cx)), float("-inf"))
        # First maximum over [own, neighbours]: ties keep the own match, then the earlier neighbour.
        best, j = torch.cat([score.reshape(-1, 1), s], 1).max(1, keepdim=True)
        by = torch.cat([pos[..., 0].reshape(-1, 1), cy], 1).gather(1, j)
        bx = torch.cat([pos[..., 1].reshape(-1, 1), cx], 1).gather(1, j)
        # Ref propagation around the freshly updated own match.
        ry, rx = (by + d[:, 0]).clamp(0, hr - 1), (bx + d[:, 1]).clamp(0, wr - 1)
        s2 = self.scores(self.ref_rows(ry, rx))
        out_score, j2 = torch.cat([best, s2], 1).max(1, keepdim=True)
        out_y = torch.cat([by, ry], 1).gather(1, j2)
        out_x = torch.cat([bx, rx], 1).gather(1, j2)
        return torch.cat([out_y, out_x], 1).view_as(pos), out_score.view_as(score)


# ----------------------------------------------------------------------------------------------------------
# Matching drivers


def _check_backend(backend: str) -> None:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    _check_backend(backend)
    if backend == "auto":  # float64 (reference checks) always takes the PyTorch path
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if backend == "triton" and dtype == torch.float64:
        raise TypeError("backend='triton' takes float32, float16 or bfloat16 features, got torch.float64")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors (on CPU only with TRITON_INTERPRET=1, set before "
            "triton is imported, for tests)"
        )
    return backend


class _Levels:
    """All references at one level, for one backend: score_positions() and step() on stacked positions
    [R, B, hq, wq, 2] and scores [R, B, hq, wq]."""

    def __init__(self, query: torch.Tensor, refs: list[torch.Tensor], backend: str):
        self.backend = backend
        if backend == "triton":
            from kernels.patchmatch import TritonLevel  # imported lazily: triton is only needed here

            self.impl = TritonLevel(query, refs)
        else:
            self.impls = [_TorchLevel(query, r) for r in refs]

    def score_positions(self, pos: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            return self.impl.score_positions(pos)
        return torch.stack([lv.score_positions(p) for lv, p in zip(self.impls, pos)])

    def step(self, pos, score, k: int, offset_corrected: bool):
        if self.backend == "triton":
            return self.impl.step(pos, score, k, offset_corrected)
        out = [lv.step(p, s, k, offset_corrected) for lv, p, s in zip(self.impls, pos, score)]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


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
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "torch" or "triton".
        history: keep a :class:`Snapshot` per level entry and per iteration in ``Match.history``.

    Returns a :class:`Match` (or a list of them). No gradient flows through matching; call
    :func:`patch_similarity` on ``pos`` for a differentiable score.
    """
    iters = _check_iters(iters)
    many = isinstance(ref, (list, tuple)) and not isinstance(ref, Pyramid)
    refs = list(ref) if many else [ref]
    if not refs:
        raise ValueError("ref is an empty list: give at least one reference map")
    q_levels = _levels(query, len(iters), "query")
    r_levels = [_levels(r, len(iters), f"ref[{i}]" if many else "ref") for i, r in enumerate(refs)]
    for i, rl in enumerate(r_levels):
        _check_pair(q_levels[-1], rl[-1], "query", f"ref[{i}]" if many else "ref")
    for i, lv in enumerate([q_levels, *r_levels]):
        for x in lv if isinstance([query, *refs][i], Pyramid) else lv[-1:]:
            _check_finite(x, "query" if i == 0 else (f"ref[{i - 1}]" if many else "ref"))
    backend = _resolve_backend(backend, q_levels[-1].device, q_levels[-1].dtype)
    B = q_levels[-1].shape[0]
    C = q_levels[-1].shape[1]
    device = q_levels[-1].device

    inits = None
    if init is not None:
        inits = list(init) if many else [init]
        if len(inits) != len(refs):
            raise ValueError(f"init has {len(inits)} entries but there are {len(refs)} references")
        for i, (p, rl) in enumerate(zip(inits, r_levels)):
            _check_positions(p, f"init[{i}]" if many else "init", B, tuple(q_levels[0].shape[-2:]),
                             tuple(rl[0].shape[-2:]), device)

    with torch.no_grad():
        pos = score = None
        flops = 0
        snaps: list[list[Snapshot]] = [[] for _ in refs]
        for lv, n_iter in enumerate(iters):
            level = _Levels(q_levels[lv], [rl[lv] for rl in r_levels], backend)
            qsize = tuple(q_levels[lv].shape[-2:])
            rsizes = [tuple(rl[lv].shape[-2:]) for rl in r_levels]
            if lv == 0:
                if inits is not None:
                    pos = torch.stack([p.to(torch.int64) for p in inits])
                else:
                    pos = torch.stack([_random_positions(*qsize, *rs, seed, device).expand(B, -1, -1, -1)
                                       for rs in rsizes])
            else:
                prev = [tuple(rl[lv - 1].shape[-2:]) for rl in r_levels]
                pos = torch.stack([upsample_positions(p, pr, rs, qsize)
                                   for p, pr, rs in zip(pos, prev, rsizes)])
            per_eval = 2 * 9 * C * B * qsize[0] * qsize[1]
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
    many = isinstance(ref, (list, tuple))
    refs = list(ref) if many else [ref]
    _check_features(query, "query")
    for i, r in enumerate(refs):
        name = f"ref[{i}]" if many else "ref"
        _check_features(r, name)
        _check_pair(query, r, "query", name)
    for i, x in enumerate([query, *refs]):
        _check_finite(x, "query" if i == 0 else (f"ref[{i - 1}]" if many else "ref"))
    out = [_enumerated_one(query, r, chunk, precision) for r in refs]
    return out if many else out[0]


# Candidates per query patch that the bf16 mode of enumerated matching re-scores in fp32.
RESCORE_TOP = 8


def _normalise(u: torch.Tensor) -> torch.Tensor:
    """Unit-norm rows (zero rows stay zero)."""
    n = u.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, u / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(u))


def _unfold_normalised(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> normalised 3x3 patch vectors [B, h*w, 9C] in fp32 (zero vector for zero patches)."""
    return _normalise(F.unfold(x.float(), 3, padding=1).transpose(1, 2))


@torch.no_grad()
def _enumerated_one(query: torch.Tensor, ref: torch.Tensor, chunk: int | None, precision: str) -> Match:
    B, C, hq, wq = query.shape
    hr, wr = ref.shape[-2:]
    Nr = hr * wr
    if chunk is None:  # query rows per matmul: keep the [chunk, Nr] score block near 64 MB
        chunk = max(16, min(hq * wq, (16 << 20) // Nr))
    pos = torch.empty(B, hq * wq, dtype=torch.int64, device=query.device)
    score = torch.empty(B, hq * wq, dtype=torch.float32, device=query.device)
    rn = _unfold_normalised(ref)  # [B, Nr, 9C]
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
    return Match(pos, score.view(B, hq, wq), 2 * 9 * C * B * hq * wq * Nr)


def _unfold_rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Normalised 3x3 patch vectors of flat pixels [start, stop) of x [1, C, h, w] -> [stop-start, 9C]."""
    h, w = x.shape[-2:]
    y0, y1 = start // w, (stop - 1) // w + 1  # rows covering the chunk, plus the 1-pixel halo
    band = F.pad(x.float(), (0, 0, 1, 1))[..., y0 : y1 + 2, :]
    u = F.unfold(band, 3, padding=(0, 1)).transpose(1, 2)[0]  # [(y1-y0)*w, 9C]
    return _normalise(u[start - y0 * w : stop - y0 * w])


def patch_similarity(query: torch.Tensor, ref: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Eq. 2: similarity of every query patch with the reference patch at ``pos`` [B, Hq, Wq, 2] (y, x):
    [B, Hq, Wq] fp32. Differentiable in query and ref (PyTorch ops on every device)."""
    _check_features(query, "query")
    _check_features(ref, "ref")
    _check_pair(query, ref, "query", "ref")
    _check_finite(query, "query")
    _check_finite(ref, "ref")
    _check_positions(pos, "pos", query.shape[0], tuple(query.shape[-2:]), tuple(ref.shape[-2:]),
                     query.device)
    return _TorchLevel(query, ref).score_positions(pos.to(torch.int64))


class CFEPatchMatch(torch.nn.Module):
    """:func:`cfe_patchmatch` as a module: ``CFEPatchMatch(iters=(1, 1, 2, 6))(query, ref) -> Match``."""

    def __init__(self, iters: Sequence[int] = (1, 1, 2, 6), *, seed: int = 0,
                 offset_corrected: bool = False, backend: str = "auto"):
        super().__init__()
        self.iters = _check_iters(iters)
        _check_backend(backend)
        self.seed, self.offset_corrected, self.backend = seed, offset_corrected, backend

    def forward(self, query, ref, init=None):
        return cfe_patchmatch(query, ref, self.iters, seed=self.seed, init=init,
                              offset_corrected=self.offset_corrected, backend=self.backend)

    def extra_repr(self) -> str:
        return f"iters={self.iters}, seed={self.seed}, offset_corrected={self.offset_corrected}, " \
               f"backend={self.backend!r}"
