"""Matchers side by side: CFE-PatchMatch (Triton, PyTorch) vs the baselines of ``bench.baselines`` and
``amsa.enumerated_match``: time, peak memory, analytic GFLOPs and quality, one CSV row per matcher.

    python -m bench.patchmatch                       # demo pair at 256x256, C=64 (filter-bank features)
    python -m bench.patchmatch --data random --size 250 --channels 256 --refs 5
    python -m bench.patchmatch --quick               # small, for CI and smoke tests

Quality is measured against exact fp32 enumerated matching (``enumerated/fp32``, computed when it fits the
budget): agreement = % of query pixels (over batch and references) with the same position; mean_score =
mean exact cosine (Eq. 1, re-scored with ``amsa.patch_similarity``) at the returned positions; gap = 1 -
mean_score / exact mean_score, in %. Calls whose estimated time exceeds the budget (from the rate an
implementation reached on a smaller shape, else a planning rate), or whose estimated memory does not fit,
are recorded as ``skipped`` with the reason. Rows go to ``bench/results/results.csv``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import amsa
from amsa.backends import numba_unavailable, triton_unavailable
from bench import baselines
from bench.common import RESULTS_CSV, append_rows, environment, measure
from bench.flops import enumerated_flops, official_patchmatch_flops, patchmatch_flops, ref_sizes


def features(data: str, size: int, channels: int, batch: int, refs: int, device: str):
    """Query [B, C, size, size] and ``refs`` reference maps at the paper's scales 0.8^i (sizes
    ``bench.flops.ref_sizes``): the demo pair through the filter bank (C = 64), or smooth random maps
    (bicubic-upsampled noise; the reference a rescaled, shifted crop of the query's source)."""
    if data == "demo":
        from amsa.demo.pair import demo_pair
        from amsa.models.matching_features import FilterBankExtractor

        pair = demo_pair(hr_size=size)
        ex = FilterBankExtractor()
        q, r = ex(pair.lr_up), ex(pair.ref_blur)
        q, r = q.expand(batch, -1, -1, -1), r.expand(batch, -1, -1, -1)
    else:
        g = torch.Generator().manual_seed(0)
        big = size + size // 4
        noise = torch.randn(batch, channels, max(2, big // 6), max(2, big // 6), generator=g).to(device)
        src = F.interpolate(noise, size=(big, big), mode="bicubic", align_corners=False)  # on the device
        q = src[..., size // 16 : size // 16 + size, size // 8 : size // 8 + size]
        r = F.interpolate(src[..., : size + size // 6, : size + size // 6], size=(size, size),
                          mode="bilinear", antialias=True)
    scaled = [r if s == (size, size) else F.interpolate(r, size=s, mode="bilinear", antialias=True)
              for s in ref_sizes(size, refs)]
    return q.contiguous().to(device), [x.contiguous().to(device) for x in scaled]


@dataclass
class Matcher:
    """run(query, refs, iters) -> list[Match]; flops(B, C, size, ref_sizes, iters); kind: the planning
    rate that applies before a measured one exists."""

    run: Callable
    flops: Callable
    kind: str
    exact_scores: bool = True  # Match.score is the fp32 cosine at pos (else re-scored for the quality)


def _pm_flops(B, C, size, rs, iters):
    return patchmatch_flops(B, C, size, iters, len(rs))


def _official_flops(B, C, size, rs, iters):
    return official_patchmatch_flops(B, C, size, iters, len(rs))


def _enum_flops(B, C, size, rs, iters):
    return enumerated_flops(B, C, size, rs)


def _exact_enumerated(q, refs, iters):
    with baselines.matmul_precision("fp32"):
        return amsa.enumerated_match(q, refs)


def matchers(device: str, offset_corrected: bool = False) -> dict[str, Matcher]:
    """Every matcher available on ``device``, in the order they are run (the exact reference first).
    ``offset_corrected`` applies to cfe_patchmatch; the official-style PatchMatch has only the paper form."""
    cfe = lambda backend: lambda q, r, it: amsa.cfe_patchmatch(q, r, it, backend=backend,
                                                               offset_corrected=offset_corrected)
    found = {
        "enumerated/fp32": Matcher(_exact_enumerated, _enum_flops, "gemm_fp32"),
        "cfe_patchmatch/torch": Matcher(cfe("torch"), _pm_flops, "pm_torch"),
        "c2_enumerated/fp32": Matcher(lambda q, r, it: baselines.c2_enumerated(q, r), _enum_flops,
                                      "conv_fp32"),
        "enumerated/bf16": Matcher(lambda q, r, it: amsa.enumerated_match(q, r, precision="bf16"),
                                   _enum_flops, "gemm_bf16"),
        "matmul_argmax/bf16": Matcher(lambda q, r, it: baselines.chunked_matmul_argmax(q, r), _enum_flops,
                                      "gemm_bf16", exact_scores=False),
    }
    if not offset_corrected:
        found["official_patchmatch/torch"] = Matcher(baselines.official_patchmatch, _official_flops,
                                                     "pm_official")
    if device == "cuda":
        found["matmul_argmax/tf32"] = Matcher(
            lambda q, r, it: baselines.chunked_matmul_argmax(q, r, precision="tf32"), _enum_flops,
            "gemm_tf32", exact_scores=False)
        for precision, kind in (("bf16", "gemm_bf16"), ("tf32", "gemm_tf32")):
            found[f"matmul_argmax_fused/{precision}"] = Matcher(
                lambda q, r, it, p=precision: baselines.matmul_argmax_fused(q, r, precision=p), _enum_flops,
                kind, exact_scores=False)
    if triton_unavailable(torch.device(device), torch.float32) is None:
        found["cfe_patchmatch/triton"] = Matcher(cfe("triton"), _pm_flops, "pm_triton")
    if numba_unavailable(torch.device(device), torch.float32) is None:
        found["cfe_patchmatch/numba"] = Matcher(cfe("numba"), _pm_flops, "pm_numba")
    return found


# Planning rates in FLOP/s, used only to skip calls that would not fit the budget before an
# implementation has a measured rate (then its rate on the previous shape is used). Deliberately low.
PLANNING_RATES = {
    "cuda": {"gemm_fp32": 20e12, "conv_fp32": 10e12, "gemm_bf16": 100e12, "gemm_tf32": 50e12,
             "pm_triton": 2e12, "pm_torch": 0.3e12, "pm_official": 0.2e12},
    "cpu": {"gemm_fp32": 60e9, "conv_fp32": 30e9, "gemm_bf16": 60e9, "gemm_tf32": 60e9,
            "pm_triton": 0.5e6, "pm_torch": 2e9, "pm_official": 2e9, "pm_numba": 10e9},  # triton: interpreter
}


def official_bytes(C: int, size: int) -> int:
    """Peak extra memory of the official-style PatchMatch: one sample's [9, 9C, N] fp32 gather and the
    product of the same size."""
    return 2 * 9 * 9 * C * size * size * 4


@dataclass
class Planner:
    """Decides what to skip: estimated time per call (x calls per measurement) against ``budget_s``,
    estimated memory against the free GPU memory, and the suite's remaining time ``deadline`` (a
    time.monotonic() value, or None)."""

    device: str
    budget_s: float
    deadline: float | None = None
    rates: dict[str, float] = field(default_factory=dict)

    def skip_reason(self, name: str, m: Matcher, flops: int, C: int, size: int) -> str:
        import time

        if self.deadline is not None and time.monotonic() > self.deadline:
            return "suite time budget exhausted"
        rate = self.rates.get(name) or PLANNING_RATES[self.device][m.kind]
        est = flops / rate
        if 2 * est > self.budget_s:  # warm-up + at least one timed call
            source = "measured" if name in self.rates else "planning"
            return f"estimated {est:.3g} s per call ({source} rate {rate / 1e9:.3g} GFLOP/s) > budget"
        if self.device == "cuda" and m.kind == "pm_official":
            need, free = official_bytes(C, size), torch.cuda.mem_get_info()[0]
            if need > 0.8 * free:
                return f"estimated {need / 2**30:.1f} GiB > 80 % of free GPU memory ({free / 2**30:.1f} GiB)"
        return ""

    def record(self, name: str, flops: int, p50_ms: float) -> None:
        self.rates[name] = flops / (p50_ms / 1e3)


def _mean_exact_score(q: torch.Tensor, refs: list[torch.Tensor], ms, exact_scores: bool) -> float:
    scores = [m.score if exact_scores else amsa.patch_similarity(q, r, m.pos) for m, r in zip(ms, refs)]
    return torch.stack([s.double().mean() for s in scores]).mean().item()


def bench_config(q: torch.Tensor, refs: list[torch.Tensor], iters: tuple[int, ...], names: list[str],
                 planner: Planner, *, quick: bool, data: str, offset_corrected: bool = False,
                 log=print) -> list[dict]:
    """Time every matcher in ``names`` on one configuration; one row each (status ok/skipped/oom)."""
    device = q.device.type
    B, C, size = q.shape[0], q.shape[1], q.shape[-1]
    rs = [tuple(r.shape[-2:]) for r in refs]
    available = matchers(device, offset_corrected)
    base = {"bench": "matching", "dtype": str(q.dtype).removeprefix("torch."), "data": data, "batch": B,
            "channels": C, "height": size, "width": q.shape[-2], "refs": len(refs)}
    exact = None
    rows = []
    for name in names:
        if name not in available:
            raise ValueError(f"unknown or unavailable matcher {name!r} on {device}; have {sorted(available)}")
        m = available[name]
        flops = m.flops(B, C, (size, size), rs, iters)
        row = {**base, "impl": name, "gflops": f"{flops / 1e9:.3f}",
               "iters": "-".join(map(str, iters)) if m.kind.startswith("pm") else "",
               "offset_corrected": int(offset_corrected) if m.kind.startswith("pm") else ""}
        reason = planner.skip_reason(name, m, flops, C, size)
        if reason:
            rows.append({**row, "status": "skipped", "note": reason})
            log(f"  {name:<28} skipped: {reason}")
            continue
        try:
            t = measure(lambda m=m: m.run(q, refs, iters), device, quick=quick, budget_s=planner.budget_s)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({**row, "status": "oom", "note": "out of memory"})
            log(f"  {name:<28} out of memory")
            continue
        planner.record(name, flops, t.p50_ms)
        ms = t.result
        if m.kind.startswith("pm") and sum(x.flops for x in ms) != flops:
            raise AssertionError(f"{name}: Match.flops {sum(x.flops for x in ms)} != analytic {flops}")
        mean = _mean_exact_score(q, refs, ms, m.exact_scores)
        quality = {"mean_score": f"{mean:.5f}"}
        if name == "enumerated/fp32":
            exact = (ms, mean)
        if exact is not None:
            same = torch.cat([(a.pos == e.pos).all(-1).flatten() for a, e in zip(ms, exact[0])])
            quality.update(agreement_pct=f"{same.double().mean().item() * 100:.3f}",
                           score_gap_pct=f"{(1 - mean / exact[1]) * 100:.4f}")
        rows.append({**row, **t.fields(), **quality, "status": "ok"})
        mem = "" if t.peak_mem_mb is None else f" {t.peak_mem_mb:9.1f} MB"
        log(f"  {name:<28} {t.p50_ms:>10.3f} ms ({t.p20_ms:.3f}-{t.p80_ms:.3f}) {flops / 1e9:>10.2f} GFLOP"
            f"{mem} agree {quality.get('agreement_pct', '-')} % score {mean:.5f}")
        del ms, t
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("demo", "random"), default="demo")
    p.add_argument("--size", type=int, default=None, help="H = W of the query map (default 256, --quick 32)")
    p.add_argument("--channels", type=int, default=64, help="channels of random data (demo: 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--refs", type=int, default=1, help="reference scales 0.8^i, i < refs (1..5)")
    p.add_argument("--iters", default="1,1,2,6", help="iterations per level, coarse to fine")
    p.add_argument("--offset-corrected", action="store_true", help="classic PatchMatch LR propagation")
    p.add_argument("--impls", default="", help="comma-separated matchers (default: all available)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget per measurement (default "
                   "60 s, --quick 5 s)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--csv", default=str(RESULTS_CSV))
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size or (32 if args.quick else 256)
    iters = tuple(int(i) for i in args.iters.split(","))
    names = args.impls.split(",") if args.impls else list(matchers(device, args.offset_corrected))
    q, refs = features(args.data, size, args.channels, args.batch, args.refs, device)
    print(f"{args.data} features: query {tuple(q.shape)}, refs {[tuple(r.shape) for r in refs]}, {device}")
    planner = Planner(device, args.budget_s or (5.0 if args.quick else 60.0))
    rows = bench_config(q, refs, iters, names, planner, quick=args.quick, data=args.data,
                        offset_corrected=args.offset_corrected)
    env = environment(device)
    append_rows([{**r, **env} for r in rows], Path(args.csv))
    print(f"{len(rows)} rows appended to {args.csv} ({env['device']}, torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
