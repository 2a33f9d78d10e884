"""Kernels and their ``torch.library`` ops (the lowest layer: never imports ``amsa``). Triton (GPU): each
``kernels/<op>*.py`` holds the ``@triton.jit`` kernels and the launcher that allocates outputs, picks block
sizes and registers the op; ``kernels/_common.py`` the plumbing they share. CPU: ``kernels/cpu_*.py`` hold
the numba kernels and their ops, ``kernels/_cpu.py`` their plumbing (JIT options, cache, threads), and no
triton import. ``kernels/_outputs.py`` allocates every kernel's outputs (poisoned under test)."""
