"""First-call cost of the CPU kernels (numba): the first call of a fresh process with an empty kernel cache
(compiles), the first call of a second process that finds the cache the first one left (loads it from
disk), and a warm call (the same call again in that process).

    python -m bench.jit

Workloads: ``cfe_patchmatch`` (paper schedule, 64x64, C = 16: the propagation-step and score kernels)
and ``deform_conv2d`` forward + backward (16 channels, 24x24, 8 offset groups: the sampling and the three
gradient kernels), both float32. Each child process gets its own empty ``NUMBA_CACHE_DIR``, so the
in-tree cache of the developer's checkout is neither used nor touched. Rows go to
``bench/results/results.csv`` (bench ``jit``, mode ``compile`` / ``cached`` / ``warm``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from amsa.backends import numba_unavailable
from bench.common import RESULTS_CSV, append_rows, environment

_SETUP = {
    "cfe_patchmatch/numba": (
        "q, r = torch.randn(1, 16, 64, 64), torch.randn(1, 16, 64, 64)",
        "amsa.cfe_patchmatch(q, r, backend='numba')",
    ),
    "deform_conv2d/numba": (
        "x = torch.randn(1, 16, 24, 24, requires_grad=True); off = torch.randn(1, 144, 24, 24); "
        "msk = torch.rand(1, 72, 24, 24); w = torch.randn(16, 16, 3, 3)",
        "amsa.deform_conv2d(x, off, w, None, 1, 1, 1, msk, backend='numba').sum().backward()",
    ),
}

_CHILD = r"""
import json, sys, time, torch, amsa
out = {}
for name, (setup, call) in json.loads(sys.argv[1]).items():
    exec(setup)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        exec(call)
        times.append((time.perf_counter() - t0) * 1e3)
    out[name] = times
print(json.dumps(out))
"""


def _child(names: list[str], cache_dir: str) -> dict[str, list[float]]:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps({n: _SETUP[n] for n in names})],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.jit child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(names: list[str] | None = None, log=print) -> list[dict]:
    """Rows (without the environment stamp): compile, cached and warm first-call times per workload."""
    reason = numba_unavailable(torch.device("cpu"), torch.float32)
    if reason is not None:
        return [{"bench": "jit", "status": "skipped", "note": reason[1]}]
    names = names or list(_SETUP)
    with tempfile.TemporaryDirectory(prefix="amsa-numba-cache-") as cache_dir:
        cold = _child(names, cache_dir)
        cached = _child(names, cache_dir)
    rows = []
    for name in names:
        times = {"compile": cold[name][0], "cached": cached[name][0], "warm": cached[name][1]}
        log(f"jit {name:<24} " + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items()))
        for mode, ms in times.items():
            rows.append({"bench": "jit", "impl": name, "mode": mode, "dtype": "float32", "status": "ok",
                         "note": "first call of a fresh process (compile: empty cache; cached: the cache the "
                                 "previous process wrote); warm: the second call",
                         "p50_ms": f"{ms:.3f}", "p20_ms": f"{ms:.3f}", "p80_ms": f"{ms:.3f}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default="", help=f"comma-separated subset of {sorted(_SETUP)}")
    p.add_argument("--csv", default=str(RESULTS_CSV))
    args = p.parse_args(argv)
    rows = run(args.impls.split(",") if args.impls else None)
    append_rows([{**r, **environment("cpu")} for r in rows], Path(args.csv))
    print(f"{len(rows)} rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
