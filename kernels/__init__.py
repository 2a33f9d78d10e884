"""Triton kernels and their ``torch.library`` ops (the lowest layer: never imports ``amsa``). Each op:
``kernels/<op>*.py`` holds the ``@triton.jit`` kernels and the launcher that allocates outputs, picks
block sizes and registers the op; ``kernels/_common.py`` the plumbing they share."""
