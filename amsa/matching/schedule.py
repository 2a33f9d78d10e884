"""The CFE-PatchMatch schedule (paper section 3.1): levels, dilations, candidates, initialisation, passing
positions up a level, and the analytic cost model every FLOP count of the project uses.

FLOPs: only the relevance scores (Eq. 1) are counted, an inner product of two 9C-vectors per query pixel
and candidate, 2 * 9C FLOPs (a multiply-add counts 2); normalisation, gathers and argmax are O(N * C) or
less and left out, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from amsa._checks import check_features, check_pair
from amsa.matching.types import Pyramid

__all__ = [
    "CANDIDATES_PER_STEP",
    "NEIGHBOURS",
    "TAPS",
    "dilations",
    "enumerated_flops",
    "evaluation_flops",
    "feature_levels",
    "level_sizes",
    "patchmatch_flops",
    "random_positions",
    "upsample_positions",
]

# The 8 neighbours d of a pixel (dy, dx), in the order candidates are tried (ties keep the earlier one).
NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
# The 9 taps of a 3x3 patch.
TAPS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
# Candidates evaluated per query pixel in one propagation step: 8 (LR) + 8 (Ref); the own match is reused.
CANDIDATES_PER_STEP = 2 * len(NEIGHBOURS)


def dilations(query_size: tuple[int, int]) -> list[int]:
    """Dilations 2^t, t = 0..T-1, of one iteration on a level whose query map is ``query_size``:
    T = max(1, floor(log2(min(h, w) / 8))) (paper, Fig. 3: t = 0 .. log2(sqrt(N) / 8) - 1, rounded down)."""
    T = max(1, math.floor(math.log2(min(query_size) / 8)))
    return [2**t for t in range(T)]


def level_sizes(size: tuple[int, int], n_levels: int) -> list[tuple[int, int]]:
    """Map sizes of the levels, coarse to fine: floor(H / 2^l) x floor(W / 2^l)."""
    return [(size[0] // 2**lv, size[1] // 2**lv) for lv in range(n_levels)][::-1]


def evaluation_flops(batch: int, channels: int, query_size: tuple[int, int]) -> int:
    """FLOPs of scoring one candidate (Eq. 1) for every pixel of a query map: 2 * 9C * B * h * w."""
    return 2 * 9 * channels * batch * query_size[0] * query_size[1]


def patchmatch_flops(
    batch: int, channels: int, size: tuple[int, int], iters: Sequence[int], refs: int = 1, *,
    candidates_per_step: int = CANDIDATES_PER_STEP, scored_on_entry: int = 1,
    steps_per_iteration: int | None = None,
) -> int:
    """FLOPs of CFE-PatchMatch with ``iters`` per level over ``refs`` references (any sizes: the cost
    depends only on the query size). Per level of h x w query pixels: ``scored_on_entry`` evaluations when
    entering it, then ``candidates_per_step`` per step, ``steps_per_iteration`` steps per iteration (default:
    the dilation rule, ``len(dilations((h, w)))``). With the defaults it equals ``cfe_patchmatch(...).flops``
    (per reference) times ``refs``; the options express other implementations' counts (benchmarks)."""
    total = 0
    for qsize, n in zip(level_sizes(size, len(iters)), iters):
        steps = steps_per_iteration or len(dilations(qsize))
        evaluations = scored_on_entry + n * steps * candidates_per_step
        total += evaluations * evaluation_flops(batch, channels, qsize)
    return total * refs


def enumerated_flops(batch: int, channels: int, size: tuple[int, int],
                     ref_sizes: Sequence[tuple[int, int]]) -> int:
    """FLOPs of enumerated matching: every query patch against every patch of every reference."""
    return sum(evaluation_flops(batch, channels, size) * h * w for h, w in ref_sizes)


def feature_levels(x, n_levels: int, name: str) -> list[torch.Tensor]:
    """Feature maps of the ``n_levels`` levels, coarse to fine: area downsampling by 2^l (floor sizes),
    or the caller's explicit :class:`Pyramid` (checked level by level)."""
    if isinstance(x, Pyramid):
        if len(x) != n_levels:
            raise ValueError(f"{name} is a Pyramid of {len(x)} levels but iters has {n_levels}")
        for i, lv in enumerate(x):
            check_features(lv, f"{name}[{i}]")
            check_pair(x[-1], lv, f"{name}[-1]", f"{name}[{i}]")
        return list(x)
    check_features(x, name)
    H, W = x.shape[-2:]
    f = 2 ** (n_levels - 1)
    if H // f < 3 or W // f < 3:
        raise ValueError(
            f"{name} is {H}x{W}, too small for {n_levels} levels: the coarsest level (1/{f}) must be at "
            f"least 3x3, i.e. the map at least {3 * f}x{3 * f}"
        )
    sizes = level_sizes((H, W), n_levels)
    return [F.interpolate(x, size=s, mode="area") for s in sizes[:-1]] + [x]


@torch.library.custom_op("amsa::random_positions", mutates_args=())
def random_positions(hq: int, wq: int, hr: int, wr: int, seed: int, device: torch.device) -> torch.Tensor:
    """[hq, wq, 2] int64 uniform random (y, x) in an hr x wr grid, from a seeded CPU torch.Generator:
    the same on every device and independent of the batch (an opaque op, so torch.compile traces it)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    y = torch.randint(0, hr, (hq, wq), generator=g)
    x = torch.randint(0, wr, (hq, wq), generator=g)
    return torch.stack([y, x], dim=-1).to(device)


@random_positions.register_fake
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
