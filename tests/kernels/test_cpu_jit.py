"""How the CPU kernels are compiled (kernels/_cpu.py): cached on disk beside the sources, in the user's
cache directory when the install is read-only, compiled per process (one warning) when nothing is
writable; numba's workqueue threading layer (no second OpenMP runtime beside torch's); torch's thread
count. Each case runs a fresh Python process on a copy of the package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import torch
torch.set_num_threads(1)
from amsa.matching.cpu_backend import CPULevel
q = torch.randn(1, 3, 6, 5)
pos = torch.zeros(1, 1, 6, 5, 2, dtype=torch.int64)
CPULevel(q, [q]).score_positions(pos)
import numba
print("layer", numba.threading_layer(), "threads", numba.get_num_threads())
"""


def _install(tmp_path: Path, writable: bool) -> Path:
    """A copy of amsa/ and kernels/ (no caches); not writable: read-only files, and kernels/__pycache__ a
    file, so no cache directory can be made beside the sources even by root."""
    site = tmp_path / "site"
    for pkg in ("amsa", "kernels"):
        shutil.copytree(ROOT / pkg, site / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    if not writable:
        (site / "kernels" / "__pycache__").write_text("not a directory")
        for path in site.rglob("*"):
            path.chmod(0o444 if path.is_file() else 0o555)
    return site


def _run(site: Path, cache_home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(cache_home), NUMBA_DEBUG_CACHE="1",
               PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env,
                          cwd=site, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _cache_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.nbi")) if folder.exists() else []


@pytest.mark.slow
def test_read_only_install_caches_kernels_in_the_user_cache_dir(tmp_path):
    site = _install(tmp_path, writable=False)
    cache_home = tmp_path / "cache"
    first, second = _run(site, cache_home), _run(site, cache_home)
    assert "[cache] data saved to" in first.stdout and "[cache] data loaded from" in second.stdout
    assert "[cache] data saved to" not in second.stdout  # the second process compiled nothing
    assert _cache_files(cache_home / "numba") and not _cache_files(site)
    assert "layer workqueue threads 1" in first.stdout


@pytest.mark.slow
def test_writable_install_caches_beside_the_sources(tmp_path):
    site = _install(tmp_path, writable=True)
    proc = _run(site, tmp_path / "cache")
    assert "[cache] data saved to" in proc.stdout
    assert _cache_files(site / "kernels" / "__pycache__") and not _cache_files(tmp_path / "cache")


@pytest.mark.slow
def test_nothing_writable_compiles_without_a_cache_and_warns_once(tmp_path):
    site = _install(tmp_path, writable=False)
    blocked = tmp_path / "cache"
    blocked.write_text("not a directory")  # no user cache directory either
    proc = _run(site, blocked)
    assert proc.stderr.count("amsa CPU kernels are not cached on disk") == 1, proc.stderr[-2000:]
    assert "[cache] data saved to" not in proc.stdout
    assert "layer workqueue" in proc.stdout
