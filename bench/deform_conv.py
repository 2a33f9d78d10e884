"""Benchmark of the modulated deformable convolution: forward, backward, forward+backward.

    python -m bench.deform_conv            # AMSA shapes on CUDA: amsa (Triton), torchvision, PyTorch path
    python -m bench.deform_conv --quick    # a few seconds; also runs on a CPU-only machine

Shapes are those of AMSA's aggregation: (B, 256, 40x40), (B, 128, 80x80), (B, 64, 160x160), 3x3,
padding 1, Cout = Cin, with a mask, for B in {1, 9} and offset groups G in {1, 8}. Offsets are random
(several pixels), masks random in (0, 1): never zeros. On CUDA, times come from
``triton.testing.do_bench`` (median and 20/80 % quantiles, L2 flushed between reps); on CPU from
repeated wall-clock runs. Every row is appended to a CSV (``--csv``) with device, versions and time.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from amsa.deform import deform_conv2d, deform_conv2d_torch
from bench.common import RESULTS, append_rows, environment, timer

FULL_SHAPES = [(b, c, hw, g) for b in (1, 9) for (c, hw) in ((256, 40), (128, 80), (64, 160)) for g in (1, 8)]
QUICK_CUDA_SHAPES = [(1, 256, 40, 1), (1, 256, 40, 8), (9, 64, 160, 8)]
QUICK_CPU_SHAPES = [(1, 16, 12, 1), (1, 16, 12, 8)]
MODES = ("fwd", "bwd", "fwd+bwd")
FIELDS = [
    "kernel", "provider", "mode", "batch", "channels", "height", "width", "offset_groups", "dtype",
    "p50_ms", "p20_ms", "p80_ms", "device", "torch", "triton", "commit", "timestamp",
]


def providers(device: str) -> dict[str, Callable]:
    """Implementations to time: name -> deform_conv2d-compatible function."""
    found: dict[str, Callable] = {}
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        found["amsa-triton"] = lambda *a: deform_conv2d(*a, backend="triton")
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


def bench_one(fn: Callable, inputs: list, mode: str, measure: Callable) -> tuple[float, float, float]:
    x, offset, weight, bias, mask = inputs
    leaves = [t.detach().requires_grad_(mode != "fwd") for t in (x, offset, weight, bias, mask)]
    call = lambda: fn(leaves[0], leaves[1], leaves[2], leaves[3], 1, 1, 1, leaves[4])
    if mode == "fwd":
        with torch.no_grad():
            return measure(call)
    out = call()
    grad = torch.randn_like(out)
    if mode == "bwd":
        return measure(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True))
    return measure(lambda: torch.autograd.grad(call(), leaves, grad))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few shapes and reps (works on CPU)")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,bwd,fwd+bwd")
    parser.add_argument("--providers", default="", help="comma-separated subset (default: all available)")
    parser.add_argument("--csv", default=str(RESULTS / "deform_conv.csv"))
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    if device == "cpu" and dtype != torch.float32:
        print(f"CPU: using float32 instead of {args.dtype}", file=sys.stderr)
        dtype = torch.float32
    shapes = FULL_SHAPES if not args.quick else (QUICK_CUDA_SHAPES if device == "cuda" else QUICK_CPU_SHAPES)
    provs = providers(device)
    if args.providers:
        provs = {k: v for k, v in provs.items() if k in args.providers.split(",")}
    if "torchvision" in provs and dtype == torch.bfloat16:
        del provs["torchvision"]  # torchvision's kernels have no bf16
    modes = [m for m in args.modes.split(",") if m]
    measure = timer(device, args.quick)

    common = {"kernel": "deform_conv2d", "dtype": str(dtype).removeprefix("torch."), **environment(device)}
    rows = []
    print(f"{'provider':<12} {'mode':<8} {'shape (B, C, HxW, G)':<24} {'p50 ms':>9} {'p20':>9} {'p80':>9}")
    for batch, channels, hw, groups in shapes:
        inputs = make_inputs(batch, channels, hw, groups, dtype, device)
        for name, fn in provs.items():
            for mode in modes:
                try:
                    p50, p20, p80 = bench_one(fn, inputs, mode, measure)
                except torch.OutOfMemoryError:
                    print(f"{name:<12} {mode:<8} out of memory")
                    torch.cuda.empty_cache()
                    continue
                shape = f"({batch}, {channels}, {hw}x{hw}, {groups})"
                print(f"{name:<12} {mode:<8} {shape:<24} {p50:>9.3f} {p20:>9.3f} {p80:>9.3f}")
                rows.append({
                    **common, "provider": name, "mode": mode, "batch": batch, "channels": channels,
                    "height": hw, "width": hw, "offset_groups": groups,
                    "p50_ms": f"{p50:.4f}", "p20_ms": f"{p20:.4f}", "p80_ms": f"{p80:.4f}",
                })
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()

    append_rows(Path(args.csv), FIELDS, rows)
    print(f"{len(rows)} rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
