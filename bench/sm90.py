"""Every kernel compiled for sm_90 (H100/H200) exactly as its launcher would launch it, and read on paper.

    python -m bench.sm90                      # all named cases -> bench/results/sm90.csv
    python -m bench.sm90 --cases patchmatch   # cases whose name contains 'patchmatch'
    python -m bench.sm90 --label after        # replaces the 'after' rows, keeps the others ('before')

No GPU is needed. The real launchers (``amsa.matching.triton_backend.TritonLevel``, the ``amsa::`` ops of
``kernels/``) are called on CPU tensors of the named real shapes while Triton's active driver is a stand-in
for an H200 (target sm_90, 132 SMs). Triton's own argument binder then specialises every launch as the
runtime would (16-byte alignment of pointers and integers, integers equal to 1, constexprs, the
launchers' block sizes, warps and stages); where a kernel is autotuned, every config is a variant. Each
variant is compiled with Triton's sm_90 pipeline instead of being launched, and read with the tools the
wheel ships (``bench/sass.py``): one CSV row per (case, variant) with registers, spill bytes, stack,
shared memory, theoretical occupancy, 128-bit global loads, tensor-core and local-memory instructions,
the loop nest, and the SASS instructions one warp executes per unit of work (for PatchMatch: per
candidate-tap), estimated from the loop nest with the trip counts the launch implies.

``check(rows)`` lists what the CI test forbids: spills, local memory, scalar gathers where the layout
allows vectors, dots without tensor cores.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import sass
from bench.common import RESULTS, git_commit, read_rows, write_rows

SM90_CSV = RESULTS / "sm90.csv"
H200_SMS = 132
H200_CLOCK_GHZ = 1.98  # boost clock; issue-bound estimates at this clock are lower bounds
ISSUE_PER_CLK = 4  # warp instructions per SM per clock (4 schedulers)

FIELDS = [
    "label", "case", "kernel", "dtype", "variant", "num_warps", "num_stages", "grid", "registers",
    "spill_bytes", "stack", "shared", "local", "warps_per_sm", "occupancy_pct", "sass", "ldg", "ldg128",
    "atomics", "atomics_vec", "tensor_core", "local_instr", "ffma", "shfl", "bar", "loop_nest",
    "dyn_per_warp", "unit", "units_per_warp", "sass_per_unit", "issue_us", "triton", "commit",
]


# ----------------------------------------------------------------------------------------- capture


@dataclass
class Launch:
    """One kernel launch as the runtime would compile it."""

    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    options: object
    attrs: dict
    args: dict  # every argument by name (tensors, ints, constexprs)
    grid: tuple

    @property
    def name(self) -> str:
        return self.fn.fn.__name__

    def key(self) -> tuple:
        return (self.name, tuple(self.signature.items()), tuple(sorted(map(str, self.constexprs.items()))),
                tuple(sorted(map(str, self.attrs.items()))), self.options.num_warps, self.options.num_stages,
                getattr(self.options, "maxnreg", None))


class _H200Driver:
    """Triton's active driver while capturing: an sm_90 target, device 0, no stream."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def capture() -> Iterator[list[Launch]]:
    """Record the launches made inside the block instead of running them (their outputs stay unwritten).

    Autotuned kernels record one launch per config (pruned as the autotuner would). The CUDA device
    queries of the launchers answer as an H200 (132 SMs)."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    pending = threading.local()
    run, do_compile, autotune_run = JITFunction.run, JITFunction._do_compile, Autotuner.run
    props = torch.cuda.get_device_properties

    def record_run(self, *args, grid, warmup, **kwargs):
        pending.call = (self, args, kwargs, grid)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def record_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        fn, args, kwargs, grid = pending.call
        names = [p.name for p in fn.params]
        bound = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
        for p in fn.params:  # defaults
            bound.setdefault(p.name, p.default)
        g = grid(bound) if callable(grid) else grid
        g = tuple(g) + (1,) * (3 - len(g))
        launches.append(Launch(self, signature, constexprs, options, attrs, bound, g))
        return None  # not compiled here, not launched

    def every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    active = driver._active
    driver.set_active(_H200Driver())
    JITFunction.run, JITFunction._do_compile, Autotuner.run = record_run, record_compile, every_config
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        multi_processor_count=H200_SMS, name="NVIDIA H200 (stand-in)")
    try:
        yield launches
    finally:
        JITFunction.run, JITFunction._do_compile, Autotuner.run = run, do_compile, autotune_run
        torch.cuda.get_device_properties = props
        driver._active = active


def compile_launch(launch: Launch):
    """Triton's sm_90 compile of one captured launch: the CompiledKernel (asm holds ptx and cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch.options.__dict__)


# ------------------------------------------------------------------------------------------- cases
# Each case calls the real launchers at a named shape; WORK says, per kernel, the trip count of each loop
# depth and the units of work one warp does (from the captured arguments), for the per-unit counts.


def _features(B, C, H, W, dtype):
    return torch.randn(B, C, H, W).to(dtype)


def _patchmatch(size: int, C: int, dtype: torch.dtype, dilations=(1, 2)):
    from amsa.matching.triton_backend import TritonLevel

    def run():
        q, r = _features(1, C, size, size, dtype), _features(1, C, size, size, dtype)
        level = TritonLevel(q, [r])
        pos = torch.stack([torch.randint(0, size, (1, 1, size, size)) for _ in range(2)], -1)
        score = level.score_positions(pos)
        for k in dilations:
            level.step(pos, score, k, False)

    return run


def _deform(B: int, C: int, hw: int, G: int, dtype: torch.dtype):
    from bench.deform_conv import make_inputs

    def run():
        import kernels.deform_conv  # noqa: F401  (registers the amsa:: ops)

        x, offset, weight, bias, mask = make_inputs(B, C, hw, G, dtype, "cpu")
        torch.ops.amsa.deform_conv2d_fwd(x, offset, mask, weight, bias, 1, 1, 1, 1, 1, 1)
        gout = torch.randn(B, C, hw, hw).to(dtype)
        torch.ops.amsa.deform_conv2d_bwd(gout, x, offset, mask, weight, 1, 1, 1, 1, 1, 1, 1, 1, 1)

    return run


def _enumerated(size: int, C: int, precision: str):
    from bench.baselines import patch_rows

    def run():
        import kernels.enumerated  # noqa: F401  (registers amsa::matmul_argmax)

        q, r = (patch_rows(_features(1, C, size, size, torch.float32), precision) for _ in range(2))
        meta = torch.tensor([[0, r.shape[1]]], dtype=torch.int64)
        torch.ops.amsa.matmul_argmax(q, r, meta, 1, int(precision != "tf32"))

    return run


# The CI test's subset (tests/kernels/test_sm90_static.py): every kernel and every shipped config in both
# dtypes, both forms of the deformable forward (channel blocks inside an offset group, and offset groups
# packed into a block), odd and 16-divisible map sizes; PatchMatch at dilation 2 only.
CI_CASES = ("patchmatch", "deform B=9 C=256 40x40 G=1", "deform B=9 C=64 160x160 G=8", "enumerated")


def cases(ci: bool = False) -> dict[str, Callable[[], None]]:
    """Named cases: the paper's PatchMatch shape (a step at dilation 1, which Triton specialises, and at
    2), AMSA's deformable convolutions, the enumerated kernel. ``ci``: the CI subset."""
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt).removeprefix("torch.")
        out[f"patchmatch 250x250 C=256 {name}"] = _patchmatch(250, 256, dt, (2,) if ci else (1, 2))
    for C, hw in ((256, 40), (128, 80), (64, 160)):
        for G in (1, 8):
            for dt in (torch.bfloat16, torch.float32):
                name = str(dt).removeprefix("torch.")
                out[f"deform B=9 C={C} {hw}x{hw} G={G} {name}"] = _deform(9, C, hw, G, dt)
    for precision in ("bf16", "tf32"):
        out[f"enumerated 250x250 C=256 {precision}"] = _enumerated(250, 256, precision)
    if ci:
        out = {k: v for k, v in out.items() if k.startswith(CI_CASES)}
    return out


def _cdiv(a, b):
    return -(-a // b)


def work(launch: Launch) -> tuple[list[float], float, str] | None:
    """(trip count per loop depth, units per warp, unit) of a launch, or None if not described."""
    a, name = launch.args, launch.name
    warps = launch.options.num_warps
    if name in ("_patchmatch_step_kernel", "_patch_score_kernel"):
        taps = 16 * 9 if name == "_patchmatch_step_kernel" else 9
        if "BLOCK_P" in a:  # the design before issue 12: loops over candidates, taps, channel blocks
            trips = [8, 9, _cdiv(a["C"], a["BLOCK_C"])][-2 - (taps > 9):]
            px, ch = a["BLOCK_P"] / warps, a["C"]
        else:  # candidates and taps unrolled; bf16 maps are read as int32 words of two channels
            pairs = launch.signature["query_ptr"] == "*i32"
            trips, px, ch = [], a["TH"] * a["TW"] / warps, a["CR"] * a["CL"] * (2 if pairs else 1)
        return trips, taps, f"candidate-tap of {px:g} px x {ch} ch"
    if name == "_deform_conv_fwd_kernel":
        unit = f"tap x {a['BLOCK_C']} ch x {a['BLOCK_P']} px x {a['BLOCK_N']} out"
        if "G" not in a:  # before issue 12: taps x channel blocks x offset groups met by the block
            cb = _cdiv(a["C_PER_G"], a["BLOCK_C"])
            return [9, cb, 1], 9 * cb, unit
        n_og = _cdiv(a["C_PER_G"], a["C_PER_OG"]) if a["C_PER_G"] >= a["C_PER_OG"] else 1
        if a.get("PACK", 1) > 1:  # taps x blocks of PACK whole offset groups
            return [9, _cdiv(n_og, a["PACK"])], 9 * _cdiv(n_og, a["PACK"]), unit
        cb = _cdiv(min(a["C_PER_G"], a["C_PER_OG"]), a["BLOCK_C"])
        return [9, n_og, cb], 9 * n_og * cb, unit  # taps x offset groups x their channel blocks
    if name == "_deform_conv_bwd_data_kernel":
        unit = f"tap x {a['BLOCK_C']} ch x {a['BLOCK_P']} px (all Cout)"
        if "NSEG" not in a:  # before issue 12
            cb = _cdiv(_cdiv(a["C_PER_OG"], a["BLOCK_C"]), a["CSPLIT"])
            nb = _cdiv(a["COUT_PER_G"], a["BLOCK_N"])
            return [9, cb, 1, nb], 9 * cb, unit
        cb = _cdiv(_cdiv(min(a["C_PER_OG"], a["C_PER_G"]), a["BLOCK_C"]), a["CSPLIT"])
        nb = 1 if a["ONE_N"] else _cdiv(a["COUT_PER_G"], a["BLOCK_N"])
        return [9, cb, nb], 9 * cb, unit
    if name == "_deform_conv_bwd_weight_kernel":
        tiles = _cdiv(a["B"] * _cdiv(a["HO"] * a["WO"], a["BLOCK_P"]), a["SPLIT"])
        return [tiles, 1], tiles, f"{a['BLOCK_P']} px x {a['BLOCK_C']} ch x {a['BLOCK_N']} out"
    if name == "_matmul_argmax_kernel":
        nr = a["r_ptr"].shape[1]
        kb = _cdiv(a["D"], a["BLOCK_K"])
        nb = _cdiv(nr, a["BLOCK_N"])
        return [nb, kb], nb * kb, f"{a['BLOCK_M']}x{a['BLOCK_N']}x{a['BLOCK_K']} MACs"
    return None


# ------------------------------------------------------------------------------------------ analysis

_PARAMS = ("BLOCK_P", "BLOCK_N", "BLOCK_C", "BLOCK_M", "BLOCK_K", "TH", "TW", "CR", "CL", "PACK", "ONE_N",
           "C_PER_OG", "IEEE", "OFFSET_CORRECTED", "k", "WIDE", "HAS_MASK", "NEED_GRAD_INPUT", "B")


def _variant(launch: Launch) -> str:
    return " ".join(f"{k}={launch.args[k]}" for k in _PARAMS
                    if k in launch.args and launch.signature.get(k) == "constexpr")


def _dtype(launch: Launch) -> str:
    for k, v in launch.signature.items():
        if k.startswith(("x_", "query", "q_", "go_")) and v.startswith("*"):
            return "bf16" if v == "*i32" else v[1:]  # PatchMatch reads bf16 maps as int32 pairs
    return ""


def analyse(launch: Launch, kernel) -> dict:
    """One CSV row (without label/case) for a compiled launch."""
    res, instrs = sass.cubin_report(kernel.asm["cubin"])
    px = sass.ptxas_report(kernel.asm["ptx"], fmad=launch.options.enable_fp_fusion)
    counts = sass.opcode_counts(instrs)
    warps = launch.options.num_warps
    per_sm = sass.occupancy(res["reg"], kernel.metadata.shared, warps)
    row = {
        "kernel": launch.name, "dtype": _dtype(launch), "variant": _variant(launch), "num_warps": warps,
        "num_stages": launch.options.num_stages, "grid": "x".join(map(str, launch.grid)),
        "registers": res["reg"], "spill_bytes": px["spill_stores"] + px["spill_loads"], "stack": res["stack"],
        "shared": kernel.metadata.shared, "local": res["local"], "warps_per_sm": per_sm,
        "occupancy_pct": round(100 * per_sm / sass.SM90["warps"]), "sass": counts["sass"],
        "ldg": counts["ldg"],
        "ldg128": counts["ldg128"], "atomics": counts["atomics"], "atomics_vec": counts["atomics_vec"],
        "tensor_core": counts["tensor_core"], "local_instr": counts["local"], "ffma": counts["ffma"],
        "shfl": counts["shfl"], "bar": counts["bar"],
        "loop_nest": sass.nest_string(instrs, sass.loops(instrs)),
    }
    if px["registers"] != res["reg"]:
        raise RuntimeError(f"{launch.name}: ptxas -v: {px['registers']} registers, the cubin {res['reg']}")
    desc = work(launch)
    dyn = sass.dynamic_count(instrs, desc[0]) if desc else None
    if desc and dyn is not None:
        programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
        issue_per_us = H200_SMS * ISSUE_PER_CLK * H200_CLOCK_GHZ * 1e3
        row.update(dyn_per_warp=round(dyn), unit=desc[2], units_per_warp=desc[1],
                   sass_per_unit=round(dyn / desc[1], 1),
                   issue_us=round(programs * warps * dyn / issue_per_us, 1))
    return row


def run(names: list[str] | None = None, label: str = "", log=print, ci: bool = False) -> list[dict]:
    """Rows for the named cases (all if None; ``ci``: the CI subset); identical specialisations are
    compiled once."""
    import triton

    compiled: dict[tuple, tuple] = {}
    rows = []
    stamp = {"label": label, "triton": triton.__version__, "commit": git_commit()}
    for case, fn in cases(ci).items():
        if names and not any(n in case for n in names):
            continue
        torch.manual_seed(0)
        with capture() as launches:
            fn()
        for launch in launches:
            key = launch.key()
            if key not in compiled:
                t0 = time.perf_counter()
                kernel = compile_launch(launch)
                compiled[key] = (kernel, time.perf_counter() - t0)
            kernel, seconds = compiled[key]
            row = {**stamp, "case": case, **analyse(launch, kernel)}
            rows.append(row)
            log(f"{case:<34} {row['kernel']:<32} {row['variant']:<40} regs {row['registers']:>3} "
                f"spill {row['spill_bytes']:>5} ldg128 {row['ldg128']:>4} tc {row['tensor_core']:>4} "
                f"per-unit {row.get('sass_per_unit', '-')!s:>7} ({seconds:.1f} s)")
    return rows


# ------------------------------------------------------------------------------------------- checks


def check(rows: list[dict]) -> list[str]:
    """What no shipped kernel may do, one line per offence: spill, use local memory, gather with scalar
    loads where the layout allows 16-byte vectors, or multiply low-precision tiles without tensor cores."""
    problems = []
    for r in rows:
        what = f"{r['case']}: {r['kernel']} [{r['variant']}, w{r['num_warps']} s{r['num_stages']}]"
        if int(r["spill_bytes"]) or int(r["local"]) or int(r["local_instr"]) or int(r["stack"]):
            problems.append(f"{what}: spills {r['spill_bytes']} B, stack {r['stack']} B, "
                            f"local {r['local']} B, {r['local_instr']} LDL/STL")
        if int(r["ldg128"]) < VECTOR_GATHERS.get(r["kernel"], 0):
            problems.append(f"{what}: {r['ldg128']} 128-bit global loads, fewer than its gathers need "
                            f"({VECTOR_GATHERS[r['kernel']]}): scalar gathers")
        if r["kernel"] in DOTS and r["dtype"] in ("bf16", "fp16") and int(r["tensor_core"]) == 0:
            problems.append(f"{what}: tl.dot on {r['dtype']} without tensor-core instructions")
    return problems


# The fewest 128-bit load instructions a kernel's gathers take when they are vectors (at the named
# shapes the layouts allow it): a PatchMatch step one per candidate-tap (16 x 9), a score one per tap,
# a deformable kernel one per bilinear corner, the matmul one per operand tile.
VECTOR_GATHERS = {"_patchmatch_step_kernel": 144, "_patch_score_kernel": 9, "_deform_conv_fwd_kernel": 4,
                  "_deform_conv_bwd_data_kernel": 4, "_deform_conv_bwd_weight_kernel": 4,
                  "_matmul_argmax_kernel": 2}
DOTS = ("_deform_conv_fwd_kernel", "_deform_conv_bwd_data_kernel", "_deform_conv_bwd_weight_kernel",
        "_matmul_argmax_kernel")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names (default: all)")
    parser.add_argument("--label", default="", help="label column (e.g. before / after)")
    parser.add_argument("--csv", default=str(SM90_CSV))
    parser.add_argument("--ci", action="store_true", help="the CI test's subset of the cases")
    args = parser.parse_args(argv)
    rows = run([c for c in args.cases.split(",") if c] or None, args.label, ci=args.ci)
    path = Path(args.csv)
    if path.exists():  # keep the other labels' rows (e.g. 'before'), and this label's other cases
        redone = {(r["label"], r["case"]) for r in rows}
        rows = [r for r in read_rows(path) if (r["label"], r["case"]) not in redone] + rows
    write_rows(path, rows, FIELDS)
    problems = check([r for r in rows if r["label"] == args.label])
    print(f"{len(rows)} rows written to {path}; {len(problems)} problems")
    for p in problems:
        print("  " + p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
