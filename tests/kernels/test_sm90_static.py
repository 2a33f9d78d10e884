"""The kernels compiled for sm_90 (H100/H200) exactly as their launchers launch them (``bench/sm90.py``), and
checked on paper: no spills or local memory in any shipped config, 16-byte gathers, tensor cores where a
low-precision ``tl.dot`` multiplies, and the PatchMatch step's targets (<= 168 registers, <= 350 SASS
instructions per candidate-tap). No GPU needed; the compile runs in a subprocess without the interpreter.
The checker itself is shown to fail: on a kernel compiled to spill, and on the kernels before issue 12."""

import pytest

from bench.common import read_rows
from bench.sm90 import SM90_CSV, check
from tests.support.sm90 import run_python

pytestmark = pytest.mark.slow

DEFORM = ("_deform_conv_fwd_kernel", "_deform_conv_bwd_data_kernel", "_deform_conv_bwd_weight_kernel")

pytest.importorskip("triton.backends.nvidia")


@pytest.fixture(scope="module")
def ci_rows(tmp_path_factory):
    """``python -m bench.sm90 --ci``: every kernel and shipped config, both dtypes (about 2-3 minutes on
    two shared cores)."""
    out = tmp_path_factory.mktemp("sm90") / "sm90.csv"
    proc = run_python(["-m", "bench.sm90", "--ci", "--label", "ci", "--csv", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_rows(out)


def test_every_shipped_kernel_config_passes(ci_rows):
    kernels = {r["kernel"] for r in ci_rows}
    assert kernels == {"_patchmatch_step_kernel", "_patch_score_kernel", "_matmul_argmax_kernel", *DEFORM}
    assert check(ci_rows) == []
    # every autotune config is a variant: the forward has several per case, the matmul five per precision
    fwd = [r for r in ci_rows if r["kernel"] == "_deform_conv_fwd_kernel"]
    assert len({(r["case"], r["variant"], r["num_warps"]) for r in fwd}) > len({r["case"] for r in fwd})
    assert sum(r["kernel"] == "_matmul_argmax_kernel" for r in ci_rows) == 10


def test_tensor_cores_and_patchmatch_targets(ci_rows):
    for r in ci_rows:
        if r["kernel"] in (*DEFORM, "_matmul_argmax_kernel") and r["dtype"] == "bf16":
            assert int(r["tensor_core"]) > 0, r
        if r["kernel"] == "_patchmatch_step_kernel":
            assert int(r["registers"]) <= 168 and float(r["sass_per_unit"]) <= 350, r
            assert int(r["ldg128"]) >= 16 * 9 and int(r["ldg"]) - int(r["ldg128"]) < 16 * 9, r


_SPILLING = r"""
import torch, triton, triton.language as tl
from bench import sm90

@triton.jit
def _spilling_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    # a wide tile kept live through a loop, under a 32-register cap: ptxas must spill it
    offs = tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + offs)
    for i in range(N):
        acc = acc * tl.load(x_ptr + (offs + i) % BLOCK) + 1.0
    tl.store(y_ptr + offs, acc)

x = torch.zeros(4096)
with sm90.capture() as launches:
    _spilling_kernel[(1,)](x, x, 3, BLOCK=4096, num_warps=1, maxnreg=32)
(launch,) = launches
row = {"case": "deliberately spilling", **sm90.analyse(launch, sm90.compile_launch(launch))}
print("PROBLEMS", sm90.check([row]))
"""


def test_checker_flags_a_spilling_kernel(tmp_path):
    script = tmp_path / "spilling.py"  # Triton reads a jit function's source from its file
    script.write_text(_SPILLING)
    proc = run_python([str(script)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBLEMS"))
    assert "spills" in line and "_spilling_kernel" in line, line


def test_committed_table_after_passes_and_before_fails():
    """bench/results/sm90.csv holds the kernels before issue 12 (label 'before') and after ('after'): the
    check passes on every 'after' row and flags the spilling / scalar-gather configs of 'before'."""
    rows = read_rows(SM90_CSV)
    after = [r for r in rows if r["label"] == "after"]
    before = [r for r in rows if r["label"] == "before"]
    assert after and before
    assert check(after) == []
    flagged = check(before)
    assert any("spills" in p and "_deform_conv_fwd_kernel" in p for p in flagged)
    assert any("spills" in p and "_patchmatch_step_kernel" in p for p in flagged)
    assert any("scalar gathers" in p and "_matmul_argmax_kernel" in p for p in flagged)
