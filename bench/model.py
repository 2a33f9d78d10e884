"""The AMSA model's inference time split into its stages: features, matching, aggregation, restoration
and the rest (everything outside the model's ``amsa.*`` profiler ranges).

    python -m bench.model [--quick]

The model's stages (``amsa.timing.stage``: profiler ranges) are timed with the device synchronised on entry
and exit (``amsa.timing.stage_times``), so each stage's time is exact on CUDA too (the synchronisations
themselves cost a few us each).
Random weights: the cost does not depend on them. Rows go to ``bench/results/results.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from amsa import AMSA
from amsa.backends import choose_backend
from amsa.timing import stage_times, timed
from bench.common import RESULTS_CSV, append_rows, environment

STAGES = ("amsa.features", "amsa.matching", "amsa.aggregation", "amsa.restoration")
# (LR size, reference size, batch): the LR-up / matching map is 4x the LR side.
FULL_SHAPES = [(64, 256, 1), (125, 500, 1), (64, 256, 9)]
# On CPU one forward of the smallest full shape already takes ~30 s on 2 cores: the larger ones are GPU-only.
CPU_SHAPES = FULL_SHAPES[:1]
QUICK_SHAPES = [(12, 48, 1)]
# The quick run's model: narrow, 2 reference scales, 2 matching levels (small enough images for them).
QUICK_MODEL = {"ngf": 16, "n_blocks": 1, "ref_scales": 2, "iters": (1, 1)}


def time_stages(model: torch.nn.Module, lr: torch.Tensor, ref: torch.Tensor, reps: int) -> dict[str, float]:
    """Median ms over ``reps`` forward passes (after a warm-up) of each stage, of 'rest' and 'total'."""
    device = lr.device
    per_rep: dict[str, list[float]] = defaultdict(list)
    for i in range(reps + 1):
        with stage_times(device) as totals, torch.no_grad():
            _, total_s = timed(lambda: model(lr, ref), device)
        if i == 0:
            continue  # warm-up: kernel compilation, cuDNN autotuning
        for s in STAGES:
            per_rep[s].append(totals[s])
        per_rep["rest"].append(total_s * 1e3 - sum(totals.values()))
        per_rep["total"].append(total_s * 1e3)
    return {k: statistics.median(v) for k, v in per_rep.items()}


def run(device: str, quick: bool, log=print) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: warned about, and irrelevant for timing
        kw = QUICK_MODEL if quick else {}
        model = AMSA(**kw).to(device).eval()
    rows = []
    backend = choose_backend(model.backend, torch.device(device), torch.float32, "bench.model")
    g = torch.Generator().manual_seed(0)
    shapes = QUICK_SHAPES if quick else FULL_SHAPES if device == "cuda" else CPU_SHAPES
    for lr_size, ref_size, batch in shapes:
        lr = torch.rand(batch, 3, lr_size, lr_size, generator=g).to(device)
        ref = torch.rand(batch, 3, ref_size, ref_size, generator=g).to(device)
        try:
            t = time_stages(model, lr, ref, reps=1 if quick else 5 if device == "cuda" else 3)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({"bench": "model", "impl": "amsa.AMSA", "batch": batch, "height": lr_size,
                         "width": lr_size, "refs": model.ref_scales, "status": "oom",
                         "note": "out of memory"})
            continue
        split = ", ".join(f"{k.removeprefix('amsa.')} {v:.1f}" for k, v in t.items())
        log(f"model LR {lr_size}x{lr_size}, ref {ref_size}x{ref_size}, B={batch} (ms): {split}")
        for stage, ms in t.items():
            rows.append({"bench": "model", "impl": "amsa.AMSA", "mode": stage.removeprefix("amsa."),
                         "dtype": "float32", "batch": batch, "channels": kw.get("ngf", 64), "height": lr_size,
                         "width": lr_size, "refs": model.ref_scales, "iters": "-".join(map(str, model.iters)),
                         "status": "ok",
                         "note": f"reference {ref_size}x{ref_size}; {backend} backend; median of reps",
                         "p50_ms": f"{ms:.3f}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and image (CPU smoke run)")
    p.add_argument("--csv", default=str(RESULTS_CSV))
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run(device, args.quick)
    append_rows([{**r, **environment(device)} for r in rows], Path(args.csv))
    print(f"{len(rows)} rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
