"""Running the sm_90 static analysis (``bench/sm90.py``) from the test suite: Triton reads TRITON_INTERPRET
when it is first imported, and the tests run under the interpreter, so compiling for sm_90 happens in a
subprocess without it. No GPU is needed (the Triton wheel ships ptxas, cuobjdump and nvdisasm)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_python(args: list[str], timeout: float = 1200) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root, without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = (str(ROOT), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
