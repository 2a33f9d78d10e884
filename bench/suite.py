"""The whole benchmark suite in one command: matchers over the size sweep, one propagation step, the
deformable op, the AMSA model's time split and (CPU) the kernels' first-call JIT cost; every row appended
to ``bench/results/results.csv``.

    python -m bench.suite --quick        # CPU smoke run, well under a minute (CI)
    python -m bench.suite                # on an H200: the full sweep within --time-budget-s (8 min)
    python -m bench.suite --sections matching --sizes 250 --channels 256   # one part

Matching configurations run in priority order: the paper's 250x250, C = 256, one reference first, then
the size sweep at C = 256, at C = 64, with 5 reference scales, with batch 9. A call whose estimate does not
fit the per-measurement budget, or anything left when the suite's time budget runs out, is recorded as
``skipped`` with the reason, so one run always finishes inside a 10-minute slot.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench import deform_conv
from bench.common import RESULTS_CSV, append_rows, environment, measure
from bench.patchmatch import Planner, bench_config, features, matchers

SIZES = (64, 128, 250, 384, 512, 1024)
CHANNELS = (256, 64)
REFS = (1, 5)
BATCHES = (1, 9)
QUICK_SIZES, QUICK_CHANNELS, QUICK_REFS, QUICK_BATCHES = (24, 32), (8,), (1, 2), (1, 2)
SECTIONS = ("matching", "step", "deform_conv", "model", "jit")
PAPER_ITERS = (1, 1, 2, 6)


def matching_configs(sizes, channels, refs, batches) -> list[tuple[int, int, int, int]]:
    """(size, C, refs, batch) in priority order: the paper's shape, then C = 256 before 64, one
    reference before several, batch 1 before 9, small sizes first within each group."""
    configs = [(s, c, r, b) for s in sizes for c in channels for r in refs for b in batches]
    paper = lambda x: x[:4] != (250, 256, 1, 1)
    return sorted(configs, key=lambda x: (paper(x), x[3] != 1, x[2] != 1, x[1] != 256, x[0]))


def run_matching(args, device: str, planner: Planner, log) -> list[dict]:
    rows = []
    names = args.impls.split(",") if args.impls else list(matchers(device))
    for size, C, refs, batch in matching_configs(args.sizes, args.channels, args.refs, args.batches):
        if min(int(size * 0.8 ** (refs - 1)), size) < 24:
            log(f"matching {size}x{size} C={C} refs={refs} B={batch}: smallest reference under 24 px "
                "(4 levels need >= 24), not run")
            continue
        log(f"matching {size}x{size} C={C} refs={refs} B={batch}")
        try:
            q, rs = features("random", size, C, batch, refs, device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows += [{"bench": "matching", "impl": n, "batch": batch, "channels": C, "height": size,
                      "width": size, "refs": refs, "status": "oom", "note": "inputs do not fit"}
                     for n in names]
            continue
        rows += bench_config(q, rs, PAPER_ITERS, names, planner, quick=args.quick, data="random", log=log)
        del q, rs
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_step(args, device: str, log) -> list[dict]:
    """One fused propagation step (8 LR + 8 Ref candidates) alone, at the finest level of the paper's
    shape, at dilation 1 (which Triton specialises) and 2: the Triton op on CUDA (fp32 and bf16), the numba
    kernel on CPU, and the PyTorch path's step for comparison."""
    from amsa.backends import numba_unavailable
    from amsa.matching.schedule import CANDIDATES_PER_STEP, evaluation_flops
    from amsa.matching.torch_backend import TorchLevels

    size, C = (32, 8) if args.quick else (250, 256)
    q32, (r32,) = features("random", size, C, 1, 1, device)
    pos = torch.stack([torch.randint(0, size, (1, 1, size, size)) for _ in range(2)], -1).to(device)
    gflops = CANDIDATES_PER_STEP * evaluation_flops(1, C, (size, size)) / 1e9
    levels = [("patchmatch_step/torch", TorchLevels, torch.float32)]
    if device == "cuda":
        from amsa.matching.triton_backend import TritonLevel

        levels = [("patchmatch_step/triton", TritonLevel, dt) for dt in (torch.float32, torch.bfloat16)] + [
            *levels]
    if numba_unavailable(torch.device(device), torch.float32) is None:
        from amsa.matching.cpu_backend import CPULevel

        levels = [("patchmatch_step/numba", CPULevel, torch.float32), *levels]
    rows = []
    for name, make, dtype in levels:
        level = make(q32.to(dtype), [r32.to(dtype)])
        s = level.score_positions(pos)
        for k in (1, 2):
            step = lambda level=level, s=s, k=k: level.step(pos, s, k, False)
            t = measure(step, device, quick=args.quick)
            dt = str(dtype).removeprefix("torch.")
            log(f"step {name:<24} {dt:<9} k={k} {size}x{size} C={C}: {t.p50_ms:.4f} ms "
                f"({t.p20_ms:.4f}-{t.p80_ms:.4f})")
            rows.append({"bench": "step", "impl": name, "dtype": dt, "data": "random", "batch": 1,
                         "channels": C, "height": size, "width": size, "refs": 1, "status": "ok",
                         "note": f"one fused step: LR (8 candidates) + Ref (8 candidates), k = {k}",
                         "gflops": f"{gflops:.4f}", **t.fields()})
    return rows


def run_model(args, device: str, log) -> list[dict]:
    from bench.model import run as run_model_split

    return run_model_split(device, args.quick, log)


def main(argv: list[str] | None = None) -> int:
    ints = lambda s: tuple(int(x) for x in s.split(","))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few reps (CPU smoke run)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--sizes", type=ints, default=None, help=f"H = W of the sweep (default {SIZES})")
    p.add_argument("--channels", type=ints, default=None, help=f"default {CHANNELS}")
    p.add_argument("--refs", type=ints, default=None, help=f"reference scales (default {REFS})")
    p.add_argument("--batches", type=ints, default=None, help=f"default {BATCHES}")
    p.add_argument("--impls", default="", help="comma-separated matchers (default: all available)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time budget of one measurement (default 20 s on CUDA, 120 s on CPU, 2 s quick)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="time budget of the whole run (default 480 s on CUDA, 3600 s on CPU, 60 s quick)")
    p.add_argument("--csv", default=str(RESULTS_CSV))
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = args.quick
    args.sizes = args.sizes or (QUICK_SIZES if q else SIZES)
    args.channels = args.channels or (QUICK_CHANNELS if q else CHANNELS)
    args.refs = args.refs or (QUICK_REFS if q else REFS)
    args.batches = args.batches or (QUICK_BATCHES if q else BATCHES)
    budget = args.budget_s or (2.0 if q else 20.0 if device == "cuda" else 120.0)
    total = args.time_budget_s or (60.0 if q else 480.0 if device == "cuda" else 3600.0)
    deadline = time.monotonic() + total
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    env = environment(device)
    print(f"suite on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})")
    rows: list[dict] = []
    planner = Planner(device, budget, deadline)
    # Sections after matching keep a share of the time: matching stops at 75 % of the budget.
    planner.deadline = time.monotonic() + 0.75 * total if len(sections) > 1 else deadline
    for section in sections:
        if time.monotonic() > deadline:
            new = [{"bench": section, "status": "skipped", "note": "suite time budget exhausted"}]
        elif section == "matching":
            new = run_matching(args, device, planner, print)
        elif section == "step":
            new = run_step(args, device, print)
        elif section == "jit":
            from bench import jit

            new = jit.run() if device == "cpu" else [{"bench": "jit", "status": "skipped",
                                                      "note": "the numba kernels run on CPU only"}]
        elif section == "deform_conv":
            dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
            new = [r for dtype in dtypes for r in deform_conv.run(device, q, dtype, list(deform_conv.MODES))]
        else:
            new = run_model(args, device, print)
        # Appended section by section: a run stopped by a device time limit keeps what it measured.
        append_rows([{**r, **env} for r in new], Path(args.csv))
        rows += new
    skipped = sum(r.get("status") != "ok" for r in rows)
    print(f"{len(rows)} rows ({skipped} skipped/oom) appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
