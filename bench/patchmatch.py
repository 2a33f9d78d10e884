"""CFE-PatchMatch vs enumerated matching: time, analytic GFLOPs and quality, one row per matcher.

    python -m bench.patchmatch                       # demo pair at 256x256, C=64 (filter-bank features)
    python -m bench.patchmatch --data random --size 250 --channels 256
    python -m bench.patchmatch --quick               # small, for CI and smoke tests

On CUDA the Triton path is first checked against the PyTorch path on the same inputs (identical positions
up to float ties, scores within 1e-4), then everything is timed with ``triton.testing.do_bench`` (median,
20/80 % quantiles); on CPU with repeated wall-clock runs (``--repeat``). Rows are appended to
``bench/results/patchmatch.csv`` with device name, versions, commit and time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import amsa
from bench.common import RESULTS, append_rows, environment, timer

FIELDS = [
    "matcher", "backend", "data", "batch", "channels", "height", "width", "refs", "iters", "offset_corrected",
    "p50_ms", "p20_ms", "p80_ms", "gflops", "agreement_pct", "mean_score", "score_gap_pct", "speedup",
    "device", "torch", "triton", "commit", "timestamp",
]


def features(data: str, size: int, channels: int, batch: int, device: str):
    """Query and reference features: the demo pair through the filter bank (C = 64), or smooth random
    maps (bicubic-upsampled noise; the reference a rescaled, shifted crop of the query's source)."""
    if data == "demo":
        from amsa.features import FilterBankExtractor
        from amsa.images import demo_pair

        pair = demo_pair(hr_size=size)
        ex = FilterBankExtractor()
        q, r = ex(pair.lr_up), ex(pair.ref_blur)
        return (q.expand(batch, -1, -1, -1).contiguous().to(device),
                r.expand(batch, -1, -1, -1).contiguous().to(device))
    g = torch.Generator().manual_seed(0)
    big = size + size // 4
    src = torch.nn.functional.interpolate(torch.randn(batch, channels, big // 6, big // 6, generator=g),
                                          size=(big, big), mode="bicubic", align_corners=False)
    q = src[..., size // 16 : size // 16 + size, size // 8 : size // 8 + size]
    r = torch.nn.functional.interpolate(src[..., : size + size // 6, : size + size // 6], size=(size, size),
                                        mode="bilinear", antialias=True)
    return q.contiguous().to(device), r.contiguous().to(device)


def check_triton_against_torch(q, r, iters, offset_corrected: bool) -> str:
    t = amsa.cfe_patchmatch(q, r, iters, backend="torch", offset_corrected=offset_corrected)
    k = amsa.cfe_patchmatch(q, r, iters, backend="triton", offset_corrected=offset_corrected)
    same = (t.pos == k.pos).all(-1).float().mean().item() * 100
    diff = (t.score - k.score).abs().max().item()
    ok = same > 99.0 and diff < 1e-4
    verdict = "OK" if ok else "FAIL"
    return f"triton vs torch: {same:.3f} % identical positions, max score diff {diff:.2e} -> {verdict}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("demo", "random"), default="demo")
    p.add_argument("--size", type=int, default=None, help="H = W of both maps (default 256, --quick 64)")
    p.add_argument("--channels", type=int, default=64, help="channels of random data (demo: 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", default="1,1,2,6", help="iterations per level, coarse to fine")
    p.add_argument("--offset-corrected", action="store_true", help="classic PatchMatch LR propagation")
    p.add_argument("--backends", default="", help="comma-separated subset of torch,triton (default: "
                   "triton on CUDA, torch on CPU; both on CUDA with --check)")
    p.add_argument("--no-enumerated", action="store_true", help="skip enumerated matching")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="enumerated matching's products (bf16: top-8 re-scored in fp32); agreement and "
                   "gap are always against fp32 enumerated matching")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--csv", default=str(RESULTS / "patchmatch.csv"))
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size or (64 if args.quick else 256)
    iters = tuple(int(i) for i in args.iters.split(","))
    default = ["torch", "triton"] if device == "cuda" else ["torch"]
    backends = args.backends.split(",") if args.backends else default
    q, r = features(args.data, size, args.channels, args.batch, device)
    C = q.shape[1]
    print(f"{args.data} features: query {tuple(q.shape)}, ref {tuple(r.shape)}, {device}")
    if device == "cuda" and "triton" in backends:
        print(check_triton_against_torch(q, r, iters, args.offset_corrected))

    measure = timer(device, args.quick)
    results = {}
    oc = args.offset_corrected
    for backend in backends:
        run = lambda b=backend: amsa.cfe_patchmatch(q, r, iters, backend=b, offset_corrected=oc)
        results[f"cfe_patchmatch/{backend}"] = (backend, measure(run), run())
    if not args.no_enumerated:
        enumerate_all = lambda: amsa.enumerated_match(q, r, precision=args.precision)
        if device == "cuda":
            results["enumerated"] = ("torch", measure(enumerate_all), enumerate_all())
        else:  # tens of seconds on CPU: with --quick a single timed run, which also gives the matches
            measure_enum = timer(device, quick=True) if not args.quick else None
            t0 = time.perf_counter()
            exact = enumerate_all()
            once = (time.perf_counter() - t0) * 1e3
            ms = measure_enum(enumerate_all) if measure_enum else (once,) * 3
            results["enumerated"] = ("torch", ms, exact)

    # Quality is always measured against the exact (fp32) enumerated matches.
    exact = results.get("enumerated", (None, None, None))[2]
    if exact is not None and args.precision != "fp32":
        exact = amsa.enumerated_match(q, r)
    env = environment(device)
    rows = []
    print(f"\n{'matcher':<24} {'p50 ms':>10} {'p20':>10} {'p80':>10} {'GFLOPs':>9} {'agree %':>8} "
          f"{'mean score':>10} {'gap %':>7} {'speed-up':>9}")
    for name, (backend, (p50, p20, p80), m) in results.items():
        agree = gap = speed = float("nan")
        if exact is not None:
            agree = (m.pos == exact.pos).all(-1).float().mean().item() * 100
            gap = (1 - m.score.mean().item() / exact.score.mean().item()) * 100
            speed = results["enumerated"][1][0] / p50
        print(f"{name:<24} {p50:>10.2f} {p20:>10.2f} {p80:>10.2f} {m.flops / 1e9:>9.2f} {agree:>8.2f} "
              f"{m.score.mean().item():>10.4f} {gap:>7.3f} {speed:>8.1f}x")
        rows.append({**env, "matcher": name.split("/")[0] + ("-bf16" if name == "enumerated" and
                                                             args.precision == "bf16" else ""),
                     "backend": backend, "data": args.data,
                     "batch": args.batch, "channels": C, "height": size, "width": size, "refs": 1,
                     "iters": "-".join(map(str, iters)) if name != "enumerated" else "",
                     "offset_corrected": int(args.offset_corrected) if name != "enumerated" else "",
                     "p50_ms": f"{p50:.3f}", "p20_ms": f"{p20:.3f}", "p80_ms": f"{p80:.3f}",
                     "gflops": f"{m.flops / 1e9:.3f}", "agreement_pct": f"{agree:.3f}",
                     "mean_score": f"{m.score.mean().item():.5f}", "score_gap_pct": f"{gap:.4f}",
                     "speedup": f"{speed:.2f}"})
    append_rows(Path(args.csv), FIELDS, rows)
    print(f"\n{len(rows)} rows appended to {args.csv} ({env['device']}, torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
