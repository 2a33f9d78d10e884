"""Plumbing of the CPU kernels (``kernels/cpu_*.py``, compiled by numba): the JIT decorators, where compiled
code is cached, the threading layer of their ``prange`` loops and its thread count.

Importing this module imports numba; an ImportError here means the CPU kernels are unavailable, and
``amsa.backends`` then falls back to the PyTorch path with one warning. No triton import: the CPU kernels
run where Triton is not installed.

* **Caching.** Kernels compile on first use (seconds) and are cached on disk (``cache=True``), so later
  processes load them in a fraction of that. Numba looks for a cache location in this order:
  ``NUMBA_CACHE_DIR``; ``__pycache__`` beside the kernel files when that is writable; the user's cache
  directory (``$XDG_CACHE_HOME/numba``, else ``~/.cache/numba``), which is what a read-only install
  uses. Where none is writable the kernels compile in every process (one warning).
* **Threading layer.** Numba's ``omp`` layer loads the system libgomp beside the one torch ships: two
  OpenMP runtimes whose idle threads spin on the same cores. Its own ``workqueue`` pool loads none and
  ran the propagation step 1.35x faster beside torch's matmuls on 2 cores (``bench.patchmatch`` notes
  in the README). It is used unless ``NUMBA_THREADING_LAYER`` says otherwise (e.g. ``tbb``). The
  workqueue pool must not be entered by two threads at once, so every launch holds :data:`LAUNCH_LOCK`.
* **Threads**: ``torch.get_num_threads()`` at each launch (``torch.set_num_threads`` steers both).
* **Fast math**: only ``reassoc`` and ``contract``: LLVM vectorises a dot product (several partial sums,
  FMAs) only when allowed to reassociate it; no ``nnan``/``ninf``/``arcp``, so comparisons, NaN handling
  and divisions stay IEEE. ``error_model="numpy"``: no ZeroDivisionError checks in the loops.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import numba
import torch

__all__ = ["LAUNCH_LOCK", "helper", "kernel", "launch"]

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

FASTMATH = {"reassoc", "contract"}
_OPTIONS = {"fastmath": FASTMATH, "error_model": "numpy", "nogil": True}

#: Held by every launch: numba's workqueue pool is not re-entrant across threads.
LAUNCH_LOCK = threading.Lock()

_warned_no_cache = False


def kernel(fn):
    """A parallel CPU kernel (``prange`` loops), compiled once per argument types and cached on disk."""
    global _warned_no_cache
    try:
        return numba.njit(parallel=True, cache=True, **_OPTIONS)(fn)
    except RuntimeError as e:  # numba found no writable cache location
        if not _warned_no_cache:
            warnings.warn(f"amsa CPU kernels are not cached on disk ({e}); they compile in every process. "
                          "Set NUMBA_CACHE_DIR to a writable directory to cache them.", RuntimeWarning,
                          stacklevel=2)
            _warned_no_cache = True
        return numba.njit(parallel=True, **_OPTIONS)(fn)


#: A helper the kernels call, inlined into them (compiled and cached as part of each kernel).
helper = numba.njit(inline="always", **_OPTIONS)


@contextlib.contextmanager
def launch():
    """Around every kernel call: one launch at a time, with torch's thread count."""
    with LAUNCH_LOCK:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        yield
