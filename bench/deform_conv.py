"""Benchmark of the modulated deformable convolution: forward, backward, forward+backward.

    python -m bench.deform_conv            # AMSA shapes: amsa (Triton on CUDA, numba on CPU), torchvision,
                                           # the PyTorch path
    python -m bench.deform_conv --quick    # a few seconds; also runs on a CPU-only machine

Shapes are those of AMSA's aggregation: (B, 256, 40x40), (B, 128, 80x80), (B, 64, 160x160), 3x3,
padding 1, Cout = Cin, with a mask, for B in {1, 9} and offset groups G in {1, 8}. Offsets are random
(several pixels), masks random in (0, 1): never zeros. On CUDA, times come from
``triton.testing.do_bench`` (median and 20/80 % quantiles, L2 flushed between reps) with the call's
peak extra memory; on CPU from repeated wall-clock runs, with the peak extra resident memory of one more
call (``bench.common.cpu_peak_extra_mb``). torchvision is optional: on a CPU-only machine where it does not
import beside the project's torch, run this module from a scratch environment that has it. Every row is
appended to
``bench/results/results.csv`` (``--csv``) with device, versions, commit and time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from amsa.backends import numba_unavailable, triton_unavailable
from amsa.deform import deform_conv2d, deform_conv2d_torch
from bench.common import RESULTS_CSV, Timing, append_rows, environment, measure

FULL_SHAPES = [(b, c, hw, g) for b in (1, 9) for (c, hw) in ((256, 40), (128, 80), (64, 160)) for g in (1, 8)]
QUICK_CUDA_SHAPES = [(1, 256, 40, 1), (1, 256, 40, 8), (9, 64, 160, 8)]
QUICK_CPU_SHAPES = [(1, 16, 12, 1), (1, 16, 12, 8)]
MODES = ("fwd", "bwd", "fwd+bwd")


def providers(device: str) -> dict[str, Callable]:
    """Implementations to time: name -> deform_conv2d-compatible function."""
    found: dict[str, Callable] = {}
    if triton_unavailable(torch.device(device), torch.float32) is None:
        found["amsa-triton"] = lambda *a: deform_conv2d(*a, backend="triton")
    if numba_unavailable(torch.device(device), torch.float32) is None:
        found["amsa-numba"] = lambda *a: deform_conv2d(*a, backend="numba")
    try:
        import torchvision.ops  # optional: present on the GPU machine, not required by amsa

        found["torchvision"] = torchvision.ops.deform_conv2d
    except ImportError:
        pass
    found["amsa-torch"] = deform_conv2d_torch
    return found


def make_inputs(batch: int, channels: int, hw: int, groups: int, dtype: torch.dtype, device: str) -> list:
    gen = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)
    x = rnd(batch, channels, hw, hw)
    offset = rnd(batch, 2 * groups * 9, hw, hw) * 3
    mask = torch.sigmoid(rnd(batch, groups * 9, hw, hw))
    weight = rnd(channels, channels, 3, 3) / (3 * channels**0.5)
    bias = rnd(channels)
    return [x, offset, weight, bias, mask]


def bench_one(fn: Callable, inputs: list, mode: str, device: str, quick: bool) -> Timing:
    x, offset, weight, bias, mask = inputs
    leaves = [t.detach().requires_grad_(mode != "fwd") for t in (x, offset, weight, bias, mask)]
    call = lambda: fn(leaves[0], leaves[1], leaves[2], leaves[3], 1, 1, 1, leaves[4])
    timing = lambda f: measure(f, device, quick=quick, memory=True)
    if mode == "fwd":
        with torch.no_grad():
            return timing(call)
    out = call()
    grad = torch.randn_like(out)
    if mode == "bwd":
        return timing(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True))
    return timing(lambda: torch.autograd.grad(call(), leaves, grad))


def run(device: str, quick: bool, dtype: torch.dtype, modes: list[str], names: list[str] | None = None,
        log=print, batches: tuple[int, ...] | None = None) -> list[dict]:
    """Rows (without the environment stamp) for every shape (of the given batch sizes), provider and mode."""
    shapes = FULL_SHAPES if not quick else (QUICK_CUDA_SHAPES if device == "cuda" else QUICK_CPU_SHAPES)
    shapes = [s for s in shapes if batches is None or s[0] in batches]
    provs = providers(device)
    if names:
        provs = {k: v for k, v in provs.items() if k in names}
    rows = []
    common = {"bench": "deform_conv", "dtype": str(dtype).removeprefix("torch.")}
    for batch, channels, hw, groups in shapes:
        inputs = make_inputs(batch, channels, hw, groups, dtype, device)
        shape = {"batch": batch, "channels": channels, "height": hw, "width": hw, "offset_groups": groups}
        for name, fn in provs.items():
            for mode in modes:
                row = {**common, **shape, "impl": name, "mode": mode}
                if name == "torchvision" and dtype == torch.bfloat16:
                    rows.append({**row, "status": "skipped", "note": "torchvision has no bf16 kernels"})
                    continue
                try:
                    t = bench_one(fn, inputs, mode, device, quick)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append({**row, "status": "oom", "note": "out of memory"})
                    log(f"{name:<12} {mode:<8} out of memory")
                    continue
                mem = "" if t.peak_mem_mb is None else f" {t.peak_mem_mb:9.1f} MB"
                log(f"{name:<12} {mode:<8} ({batch}, {channels}, {hw}x{hw}, {groups}) {row['dtype']:<9} "
                    f"{t.p50_ms:>9.3f} {t.p20_ms:>9.3f} {t.p80_ms:>9.3f}{mem}")
                rows.append({**row, **t.fields(), "status": "ok"})
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few shapes and reps (works on CPU)")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,bwd,fwd+bwd")
    parser.add_argument("--providers", default="", help="comma-separated subset (default: all available)")
    parser.add_argument("--batches", default="", help="comma-separated batch sizes (default: all)")
    parser.add_argument("--csv", default=str(RESULTS_CSV))
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    if device == "cpu" and dtype != torch.float32:
        print(f"CPU: using float32 instead of {args.dtype}", file=sys.stderr)
        dtype = torch.float32
    modes = [m for m in args.modes.split(",") if m]
    print(f"{'provider':<12} {'mode':<8} (B, C, HxW, G) dtype  p50 ms  p20  p80  peak extra memory")
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else None
    rows = run(device, args.quick, dtype, modes, args.providers.split(",") if args.providers else None,
               batches=batches)
    env = environment(device)
    append_rows([{**r, **env} for r in rows], Path(args.csv))
    print(f"{len(rows)} rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
