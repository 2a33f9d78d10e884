"""Shared benchmark plumbing: timing with quantiles and peak memory, the environment stamp of every
result row, and the one results CSV (``bench/results/results.csv``) every benchmark appends to.

Timing. CUDA: ``triton.testing.do_bench`` (warm-up, L2 flushed between reps, median and 20/80 %
quantiles) for calls under 100 ms; longer calls are timed with CUDA events over a few reps, within the
time budget (do_bench would first spend 5 calls estimating). CPU: repeated wall-clock runs after a
warm-up, as many as ``budget_s`` allows (at least one).

Peak memory: CUDA: ``torch.cuda.max_memory_allocated`` during one call, minus what was allocated before
it (the call's extra memory). CPU (``memory=True``, Linux): the peak resident set size during one extra
call after the warm-up, minus the resident size before it (``/proc/self/status`` VmHWM, reset through
``/proc/self/clear_refs``; freed heap memory is first returned to the system with glibc's
``malloc_trim``, so memory the allocator kept from earlier calls counts again when it is touched). It
counts every allocation of the process (PyTorch, numba, BLAS workspaces), not only the tensors'.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import datetime
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from amsa.timing import timed

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_CSV = RESULTS / "results.csv"

# Columns of results.csv. bench: matching | step | deform_conv | model; impl: implementation/provider;
# status: ok | skipped | oom | error, with the reason in note.
FIELDS = [
    "bench", "impl", "mode", "dtype", "data", "batch", "channels", "height", "width", "refs", "iters",
    "offset_corrected", "offset_groups", "status", "note", "p50_ms", "p20_ms", "p80_ms", "peak_mem_mb",
    "gflops", "agreement_pct", "mean_score", "score_gap_pct", "device", "torch", "triton", "commit",
    "timestamp",
]
# do_bench for calls shorter than this (ms); CUDA events over a few reps above it.
DO_BENCH_MAX_MS = 100.0


@dataclass
class Timing:
    p50_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: float | None  # extra memory of one call (CUDA; CPU when asked), else None
    result: Any  # what the warm-up call returned (for quality checks)

    def fields(self) -> dict[str, str]:
        return {"p50_ms": f"{self.p50_ms:.4f}", "p20_ms": f"{self.p20_ms:.4f}",
                "p80_ms": f"{self.p80_ms:.4f}",
                "peak_mem_mb": "" if self.peak_mem_mb is None else f"{self.peak_mem_mb:.1f}"}


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=5, method="inclusive")
    return statistics.median(times), q[0], q[3]


def _resident_mb() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process in MB."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}


def cpu_peak_extra_mb(fn: Callable[[], Any]) -> float | None:
    """Peak extra resident memory (MB) of one call of ``fn`` (module docstring); None where the kernel's
    counters are not available (not Linux)."""
    try:
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        before = _resident_mb()["VmRSS"]
    except (OSError, KeyError):
        return None
    fn()
    return _resident_mb()["VmHWM"] - before


def measure(fn: Callable[[], Any], device: str, *, quick: bool = False, budget_s: float = 10.0,
            memory: bool = False) -> Timing:
    """Time ``fn()``: median and 20/80 % quantiles in ms, peak extra memory (CUDA always; CPU with
    ``memory``: one more call), and the warm-up's result."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    result, first_s = timed(fn, device)  # warm-up: compiles kernels, fills caches
    first_ms = first_s * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    if memory and not cuda:
        peak = cpu_peak_extra_mb(fn)
    reps = 3 if quick else 10
    if cuda and first_ms < DO_BENCH_MAX_MS:
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200,
                                                quantiles=[0.5, 0.2, 0.8])
        return Timing(p50, p20, p80, peak, result)
    reps = max(1, min(reps, int(budget_s * 1e3 / max(first_ms, 1e-3))))
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(timed(fn, device)[1] * 1e3)
    return Timing(*_quantiles(times), peak, result)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def environment(device: str) -> dict[str, str]:
    """Device name, library versions, commit and UTC time: the stamp every result row carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return {
        "device": name, "torch": torch.__version__, "triton": triton_version, "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def append_rows(rows: list[dict], path: Path = RESULTS_CSV) -> None:
    """Append ``rows`` (dicts over FIELDS; missing fields empty) to the results CSV at ``path``."""
    unknown = {k for r in rows for k in r} - set(FIELDS)
    if unknown:
        raise ValueError(f"rows have fields not in bench.common.FIELDS: {sorted(unknown)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def write_rows(path: Path | str, rows: Sequence[dict], fields: Sequence[str] | None = None) -> None:
    """Write ``rows`` as a new CSV at ``path`` (its folder created): columns ``fields``, missing ones
    empty, or the first row's keys."""
    if not rows and fields is None:
        raise ValueError(f"write_rows: no rows for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields or rows[0]), restval="")
        w.writeheader()
        w.writerows(rows)


def read_rows(path: Path = RESULTS_CSV) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
