"""Argument checks shared by the library, with one error vocabulary: every message names the argument
and what was expected. ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, size,
device or value.

Checks that read tensor values (NaN/Inf, positions inside a grid) synchronise the device; they are
skipped while ``torch.compile`` traces (``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Feature dtypes of the matcher and of the numba kernels (float64 for reference checks and gradcheck; the
#: kernels widen float16 and bfloat16 to float32).
FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def as_list(x, name: str, *, single: tuple[type, ...] = ()) -> tuple[list, list[str], bool]:
    """One argument or a list/tuple of them -> (items, their names for messages, whether it was a list).

    Names are ``name`` for a single item and ``name[i]`` for list members; instances of ``single`` (e.g.
    :class:`amsa.Pyramid`, itself a tuple) count as one item. An empty list raises."""
    many = isinstance(x, (list, tuple)) and not isinstance(x, single)
    items = list(x) if many else [x]
    if not items:
        raise ValueError(f"{name} is an empty list: give at least one")
    names = [f"{name}[{i}]" for i in range(len(items))] if many else [name]
    return items, names, many


def check_tensor(x, name: str, dims: int, layout: str) -> None:
    """``x`` is a tensor of ``dims`` dimensions (``layout`` names them, e.g. ``"[B, C, H, W]"``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(x.shape)}")


def check_dtype(x: torch.Tensor, name: str, dtypes: Sequence[torch.dtype], what: str) -> None:
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got {x.dtype}")


def check_same(x: torch.Tensor, name: str, like: torch.Tensor, like_name: str, *, dtype: bool = True,
               device: bool = True) -> None:
    """``x`` agrees with ``like`` in dtype and device."""
    if device and x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")
    if dtype and x.dtype != like.dtype:
        raise TypeError(f"{name} is {x.dtype} but {like_name} is {like.dtype}; use one dtype")


def check_finite(x: torch.Tensor, name: str) -> None:
    """NaN/Inf features raise: the cosine of such patches is undefined."""
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} contains NaN or Inf; cosine similarity is undefined for such patches "
            "(replace them, e.g. with torch.nan_to_num, before matching)"
        )


def check_features(x, name: str) -> None:
    """Matching features: [B, C, H, W] floating point, B, C > 0, at least one 3x3 patch."""
    check_tensor(x, name, 4, "[B, C, H, W]")
    check_dtype(x, name, FEATURE_DTYPES, "float32, float16 or bfloat16 (float64 for checks)")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have batch and channels > 0, got shape {tuple(x.shape)}")
    if x.shape[2] < 3 or x.shape[3] < 3:
        raise ValueError(f"{name} must be at least 3x3 (one 3x3 patch), got {tuple(x.shape[2:])}")


def check_pair(query: torch.Tensor, ref: torch.Tensor, qname: str, rname: str) -> None:
    """A reference map fits its query: same batch, channels, device and dtype."""
    if ref.shape[0] != query.shape[0]:
        raise ValueError(f"{rname} has batch {ref.shape[0]} but {qname} has batch {query.shape[0]}")
    if ref.shape[1] != query.shape[1]:
        raise ValueError(f"{rname} has {ref.shape[1]} channels but {qname} has {query.shape[1]}")
    check_same(ref, rname, query, qname)


def check_positions(pos, name: str, batch: int, size: tuple[int, int], ref_size: tuple[int, int],
                    device: torch.device) -> None:
    """Integer (y, x) positions [B, Hq, Wq, 2] inside a reference grid of ``ref_size``."""
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


def check_iters(iters) -> tuple[int, ...]:
    """Iterations per matching level, coarse to fine: a non-empty sequence of non-negative ints."""
    if isinstance(iters, int) or not isinstance(iters, Sequence):
        raise TypeError(f"iters must be a sequence of per-level iteration counts, got {iters!r}")
    iters = tuple(iters)
    if not iters:
        raise ValueError("iters must not be empty: give one iteration count per level, coarse to fine")
    for n in iters:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"iters must hold non-negative ints, got {iters!r}")
    return iters


def check_image(x, name: str) -> torch.Tensor:
    """An RGB image batch [B, 3, H, W], floating point (values in [0, 1])."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an RGB image batch [B, 3, H, W] in [0, 1], got {got}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point image in [0, 1], got {x.dtype}")
    return x


def check_matching(query, ref) -> tuple[list[torch.Tensor], list[str], bool]:
    """Inputs of a matcher: ``query`` [B, C, Hq, Wq] and ``ref`` (one map or a list of maps) of the same
    batch, channels, dtype and device, all finite. Returns ``as_list(ref, "ref")``."""
    refs, names, many = as_list(ref, "ref")
    check_features(query, "query")
    check_finite(query, "query")
    for r, name in zip(refs, names):
        check_features(r, name)
        check_pair(query, r, "query", name)
        check_finite(r, name)
    return refs, names, many
