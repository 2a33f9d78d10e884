"""Ahead-of-time compilation of Triton kernels for sm_90 (H100/H200) with the ptxas bundled in the
Triton wheel: no GPU needed. The interpreter accepts code that the compiler rejects, so every kernel is
also compiled. Runs in a subprocess, since TRITON_INTERPRET is fixed when triton is first imported."""

import inspect
import os
import subprocess
import sys
from pathlib import Path


def compile_for_sm90(kernel, types, constexprs: dict, num_warps: int) -> None:
    """Compile ``kernel``; ``types(name)`` gives the Triton type of each non-constexpr argument."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    while not isinstance(kernel, triton.runtime.jit.JITFunction):  # unwrap autotuners
        kernel = kernel.fn
    sig = {name: "constexpr" if name in constexprs else types(name)
           for name in inspect.signature(kernel.fn).parameters}
    triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": 2})


def run_script(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (which calls compile_for_sm90) without the interpreter, from the repository root."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = (str(root), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
