"""Device-synchronised wall-clock timing, shared by the demo, the benchmarks and the model's stages.

* :func:`timed`: one call, the device synchronised before and after.
* :func:`stage`: a named stage of a computation (the model's ``amsa.features``, ``amsa.matching``, ...):
  a ``torch.profiler.record_function`` range and, inside :func:`stage_times`, a synchronised timer.
  Stages are not nested.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import record_function

__all__ = ["stage", "stage_times", "synchronize", "timed"]

_totals: contextvars.ContextVar[tuple[dict[str, float], torch.device] | None] = contextvars.ContextVar(
    "amsa_stage_totals", default=None)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, float]:
    """``(fn(), seconds)``, the device synchronised before and after the call."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """A named stage: a profiler range, timed (device synchronised) inside :func:`stage_times`."""
    active = _totals.get()
    with record_function(name):
        if active is None:
            yield
            return
        totals, device = active
        synchronize(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(device)
            totals[name] += (time.perf_counter() - t0) * 1e3


@contextlib.contextmanager
def stage_times(device: torch.device | str) -> Iterator[dict[str, float]]:
    """Collect the milliseconds spent in each :func:`stage` while the block runs: ``{name: ms}``."""
    totals: dict[str, float] = defaultdict(float)
    token = _totals.set((totals, torch.device(device)))
    try:
        yield totals
    finally:
        _totals.reset(token)
