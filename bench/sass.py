"""Reading a compiled sm_90 kernel: resource usage, SASS instruction counts, loop structure, occupancy.

The tools are the ones the Triton wheel ships (``triton/backends/nvidia/bin``): ``ptxas -v`` (registers,
stack frame, spill bytes), ``cuobjdump -res-usage`` (registers, stack, shared and local memory of the cubin
Triton built) and ``cuobjdump -sass`` (the machine code). No GPU is needed.

Loops are found from the SASS: a branch to a lower address closes a loop spanning [target, branch].
The dynamic instruction count of one warp running the kernel is estimated from the loop nest and the
trip count the caller gives for each nesting depth (straight-line code counts once, a loop's body trip
times); copies of a loop body that the compiler peels out of a loop count once, as straight-line code.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# sm_90 (H100/H200): per SM 64 resident warps, 32 CTAs, 65536 registers allocated per warp in units of
# 256, 228 KB of shared memory of which a CTA may use 227 KB, 1 KB reserved per CTA.
SM90 = {"warps": 64, "ctas": 32, "regs": 65536, "reg_unit": 256, "smem": 228 * 1024, "smem_cta": 1024}

# Opcode families counted in every report.
TENSOR_CORE = ("HMMA", "HGMMA", "WGMMA", "IMMA", "QGMMA")
LOCAL_MEMORY = ("LDL", "STL")

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")


def tool(name: str) -> str:
    """Path of a CUDA tool shipped in the Triton wheel (ptxas, cuobjdump, nvdisasm)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in the Triton wheel ({path})")
    return str(path)


@dataclass
class Instr:
    addr: int
    op: str  # full opcode with modifiers, e.g. LDG.E.128
    operands: str
    predicated: bool

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


def parse_sass(text: str) -> list[Instr]:
    """Instructions of ``cuobjdump -sass`` output (one function), in address order."""
    out = []
    for m in _LINE.finditer(text):
        out.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip(), bool(m.group(2))))
    return out


@dataclass
class Loop:
    start: int  # address of the first instruction of the body
    end: int  # address of the backward branch
    children: list[Loop] = field(default_factory=list)

    def contains(self, other: Loop) -> bool:
        return self.start <= other.start and other.end <= self.end and (self.start, self.end) != (
            other.start, other.end)


def loops(instrs: list[Instr]) -> list[Loop]:
    """Top-level loops (with their nested loops) from the backward branches of the SASS."""
    found = []
    for ins in instrs:
        if ins.base in ("BRA", "JMP") and (m := _TARGET.search(ins.operands)):
            target = int(m.group(1), 16)
            if target < ins.addr:  # (a branch to itself after EXIT is no loop)
                found.append(Loop(target, ins.addr))
    # Branches sharing a target (a loop with several continue paths) are one loop.
    merged: dict[int, Loop] = {}
    for lp in found:
        if lp.start not in merged or merged[lp.start].end < lp.end:
            merged[lp.start] = lp
    roots: list[Loop] = []
    for lp in sorted(merged.values(), key=lambda x: (x.start, -x.end)):
        parent = _innermost_container(roots, lp)
        (parent.children if parent else roots).append(lp)
    return roots


def _innermost_container(nodes: list[Loop], lp: Loop) -> Loop | None:
    for n in nodes:
        if n.contains(lp):
            return _innermost_container(n.children, lp) or n
    return None


def _count(instrs: list[Instr], start: int, end: int) -> int:
    return sum(1 for i in instrs if start <= i.addr <= end and i.op != "NOP")


def loop_depth(roots: list[Loop]) -> int:
    return 0 if not roots else 1 + max(loop_depth(r.children) for r in roots)


def nest_string(instrs: list[Instr], roots: list[Loop]) -> str:
    """Loop nest as text: each loop is [n ...] with n its own static instructions (nested loops not
    counted), e.g. '[12 [40]] [12 [40]]' for two loops each holding one inner loop."""

    def one(lp: Loop) -> str:
        own = _count(instrs, lp.start, lp.end) - sum(_count(instrs, c.start, c.end) for c in lp.children)
        inner = " ".join(one(c) for c in lp.children)
        return f"[{own}{' ' + inner if inner else ''}]"

    return " ".join(one(r) for r in roots)


def dynamic_count(instrs: list[Instr], trips: list[float] | None) -> float | None:
    """Instructions one warp executes: straight-line code once, a loop at depth d (1 = outermost) its
    body ``trips[d - 1]`` times. None when the nest is deeper than ``trips`` says (the compiler
    built a different loop structure than the caller assumed)."""
    roots = loops(instrs)
    trips = trips or []
    if loop_depth(roots) > len(trips):
        return None

    def body(lp: Loop, depth: int) -> float:
        own = _count(instrs, lp.start, lp.end) - sum(_count(instrs, c.start, c.end) for c in lp.children)
        return own + sum(trips[depth] * body(c, depth + 1) for c in lp.children)

    total = _count(instrs, 0, instrs[-1].addr) if instrs else 0
    total -= sum(_count(instrs, r.start, r.end) for r in roots)
    return total + sum(trips[0] * body(r, 1) for r in roots)


def opcode_counts(instrs: list[Instr]) -> dict[str, int]:
    """Static counts of the opcode families the reports need."""
    ops = [i.op for i in instrs if i.op != "NOP"]
    return {
        "sass": len(ops),
        "ldg": sum(1 for o in ops if o.startswith("LDG")),
        "ldg128": sum(1 for o in ops if o.startswith("LDG") and o.endswith(".128")),
        "stg128": sum(1 for o in ops if o.startswith("STG") and o.endswith(".128")),
        "atomics": sum(1 for o in ops if o.startswith(("RED", "ATOM"))),
        "atomics_vec": sum(1 for o in ops if o.startswith(("RED", "ATOM")) and
                           re.search(r"\.(64|128|V2|V4|F16x2|BF16x2|F32x2)", o) is not None),
        "tensor_core": sum(1 for o in ops if o.split(".")[0] in TENSOR_CORE),
        "local": sum(1 for o in ops if o.split(".")[0] in LOCAL_MEMORY),
        "ffma": sum(1 for o in ops if o.startswith("FFMA")),
        "shfl": sum(1 for o in ops if o.startswith("SHFL")),
        "bar": sum(1 for o in ops if o.startswith("BAR")),
    }


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def ptxas_path(capability: int = 90) -> str:
    """The ptxas Triton itself runs for ``capability`` (triton 3.9: the CUDA 13 'ptxas-blackwell' from
    sm_90 on; older wheels: 'ptxas')."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).path
    except (ImportError, TypeError, AttributeError):
        return tool("ptxas")


def ptxas_report(ptx: str, fmad: bool = True) -> dict[str, int]:
    """``ptxas -v`` on the PTX with the flags Triton's sm_90 backend uses (-lineinfo, register allocation
    level 2, sm_90a): registers, stack frame and spill bytes."""
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [ptxas_path(), "-lineinfo", *([] if fmad else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={arch}", str(src), "-o", str(Path(d) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return {k: int(m.group(1)) if (m := rx.search(log)) else 0 for k, rx in _PTXAS.items()}


def cubin_report(cubin: bytes) -> tuple[dict[str, int], list[Instr]]:
    """``cuobjdump -res-usage`` fields and the parsed SASS of a single-kernel cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    m = _RES.search(res)
    fields = dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups())))
    return fields, parse_sass(sass)


def occupancy(registers: int, shared_bytes: int, num_warps: int, limits: dict = SM90) -> int:
    """Resident warps per SM (theoretical occupancy) for a CTA of ``num_warps`` warps."""
    regs_per_warp = -(-max(registers, 1) * 32 // limits["reg_unit"]) * limits["reg_unit"]
    by_regs = limits["regs"] // regs_per_warp // num_warps
    by_smem = limits["smem"] // (shared_bytes + limits["smem_cta"])
    by_warps = limits["warps"] // num_warps
    return min(by_regs, by_smem, by_warps, limits["ctas"]) * num_warps
