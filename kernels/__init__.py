"""Triton kernels and their launchers. Each op: ``kernels/<op>.py`` holds the ``@triton.jit`` kernels and
the launcher that allocates outputs, picks block sizes and registers the op with ``torch.library``."""
