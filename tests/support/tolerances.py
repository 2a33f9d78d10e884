"""The test suite's tolerances, in one place: per dtype, scaled by the length of the reduction behind the
value (FlagGems' rule), and for low precision relative to PyTorch's own same-dtype error.

No test compares floats bitwise across differently shaped or ordered computations (backends, batch or
chunk shapes, memory layouts): BLAS blocking, and so rounding, differs between CPUs. Positions chosen by
an argmax are compared with :func:`assert_matches_agree`: equal except at near-ties.
"""

import torch

from tests.support.references import similarity64

# (rtol, atol per term of the reduction) of a computation accumulated in this dtype.
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 2e-6)}


def atol(dtype: torch.dtype, reduction: int = 1) -> float:
    """Absolute tolerance of a value reduced over ``reduction`` terms in ``dtype``."""
    return TOLERANCES[dtype][1] * reduction


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, reduction: int = 1,
                 msg: str = "") -> None:
    """``got`` (computed in ``dtype``) equals ``ref`` up to ``dtype``'s tolerance, atol scaled by the
    reduction length (e.g. channels x taps)."""
    rtol = TOLERANCES[dtype][0]
    torch.testing.assert_close(got.detach().cpu().double(), ref.detach().cpu().double(), rtol=rtol,
                               atol=atol(dtype, reduction), msg=msg)


def assert_close_lowp(got: torch.Tensor, same_dtype: torch.Tensor, ref: torch.Tensor, msg: str = "") -> None:
    """Low precision: the error against the float64 reference may be at most 2x the PyTorch path's own
    same-dtype error (plus one ulp of the output scale for ties at tiny sizes)."""
    ref = ref.detach().cpu().double()
    err = (got.detach().cpu().double() - ref).abs().max().item()
    base = (same_dtype.detach().cpu().double() - ref).abs().max().item()
    slack = torch.finfo(got.dtype).eps * ref.abs().max().item()
    assert err <= 2 * base + slack, f"{msg}: error {err:.3g} > 2 x PyTorch's same-dtype error {base:.3g}"


def cosine_atol(dtype: torch.dtype, channels: int) -> float:
    """Tolerance of a 3x3 patch cosine (Eq. 1) over ``channels``: its n = 9C products of unit-norm vectors
    sum to at most 1 in magnitude, so accumulation in ``dtype`` errs by at most n unit roundoffs; 4x that
    (norms and the division add a few). fp16/bf16 features accumulate in fp32."""
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return 4 * 9 * channels * torch.finfo(acc).eps / 2


def assert_cosines_close(got: torch.Tensor, ref: torch.Tensor, channels: int,
                         dtype: torch.dtype = torch.float32, msg: str = "") -> None:
    """Patch cosines ``got`` (accumulated in ``dtype``) equal ``ref`` within :func:`cosine_atol`."""
    torch.testing.assert_close(got.detach().cpu().double(), ref.detach().cpu().double(), rtol=0,
                               atol=cosine_atol(dtype, channels), msg=msg)


def assert_matches_agree(a, b, query: torch.Tensor | None = None, ref: torch.Tensor | None = None, *,
                         dtype: torch.dtype = torch.float32, channels: int | None = None,
                         max_differ: float = 0.02) -> None:
    """Two matches (``pos`` [B, Hq, Wq, 2], ``score`` [B, Hq, Wq]) computed in differently ordered ways
    agree: scores within :func:`cosine_atol` everywhere, and positions equal except at near-ties, on at
    most ``max_differ`` of the pixels. A near-tie: both positions score within that tolerance of each
    other, in float64 on ``query`` and ``ref`` when given, else by the matches' own scores (each the
    cosine at its position, checked against float64 elsewhere)."""
    if query is not None:
        channels = query.shape[1]
    tol = cosine_atol(dtype, channels)
    pa, pb = a.pos.detach().cpu(), b.pos.detach().cpu()
    sa, sb = a.score.detach().cpu().double(), b.score.detach().cpu().double()
    torch.testing.assert_close(sa, sb, atol=tol, rtol=0)
    differ = (pa != pb).any(-1)
    if query is not None:
        q, r = query.detach().cpu(), ref.detach().cpu()
        gap = (similarity64(q, r, pa) - similarity64(q, r, pb)).abs()
    else:
        gap = (sa - sb).abs()
    if differ.any():
        worst = gap[differ].max().item()
        assert worst <= tol, f"positions differ beyond near-ties: score gap {worst:.3g} > {tol:.3g}"
    assert differ.double().mean() <= max_differ, f"{int(differ.sum())} of {differ.numel()} positions differ"
