"""Shared benchmark plumbing: timing (CUDA: triton.testing.do_bench; CPU: repeated wall clock), the
environment stamp of every result row, and appending rows to one CSV per benchmark."""

from __future__ import annotations

import csv
import datetime
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timer(device: str, quick: bool) -> Callable[[Callable], tuple[float, float, float]]:
    """A function timing ``fn()``: (median, 20 %, 80 % quantiles) in milliseconds, after a warm-up run."""
    if device == "cuda":
        import triton.testing

        def cuda_time(fn):
            reps = 50 if quick else 200
            return tuple(triton.testing.do_bench(fn, warmup=25, rep=reps, quantiles=[0.5, 0.2, 0.8]))

        return cuda_time

    def cpu_time(fn):
        fn()
        times = []
        for _ in range(3 if quick else 10):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
        return statistics.median(times), q[0], q[3]

    return cpu_time


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


def append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
