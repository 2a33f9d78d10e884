"""Data-parallel training under ``torchrun``: the process group, DDP wrappers and replica bookkeeping.

One process per device; a single process uses neither a process group nor DDP (every helper here is then
the identity). DDP's per-forward buffer broadcast is off: it copies rank 0's buffers at the *start* of each
forward, so the replicas' BatchNorm statistics would still differ after the last forward (and in
checkpoints), at one broadcast per critic forward. Instead floating-point buffers (the critic's BN running
statistics) are averaged over the processes after every update (:meth:`ProcessGroup.average_`), which
keeps the replicas bitwise identical.
"""

from __future__ import annotations

import inspect
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ProcessGroup", "device_kind", "no_sync", "resolve_device", "unwrap"]


class ProcessGroup:
    """The process group of a ``torchrun`` launch (world size 1 without one)."""

    def __init__(self, device_kind: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors over processes in place (one flat all-reduce)."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast_buffers_(self, module: nn.Module) -> None:
        """Rank 0's buffers to every process (DDP broadcasts the parameters when it wraps a module)."""
        if self.world > 1:
            for t in module.buffers():
                dist.broadcast(t.data, 0)

    def wrap(self, module: nn.Module, device: torch.device, only: nn.Module | None = None) -> nn.Module:
        """``module`` in :class:`DistributedDataParallel` (``module`` itself in a single process).

        ``only``: a submodule of ``module``; DDP then ignores (neither broadcasts nor reduces) every
        parameter and buffer outside it. Unused parameters are not searched for (every trained parameter
        gets a gradient each micro-batch), and buffers are not broadcast at each forward (see the module
        docstring).
        """
        if self.world == 1:
            return module
        if only is not None:
            prefix = next(name for name, m in module.named_modules() if m is only)
            inside = prefix + "."
            ignore = [
                name
                for name, _ in [*module.named_parameters(), *module.named_buffers()]
                if not name.startswith(inside)
            ]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            **_DDP_NO_FORWARD_BUFFER_SYNC,
        )

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


# Turn off DDP's buffer broadcast at every forward (torch >= 2.13 names it forward_sync_buffers and
# deprecates broadcast_buffers; older releases only know broadcast_buffers).
_DDP_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def no_sync(module: nn.Module):
    """DDP's ``no_sync()`` (no all-reduce in this backward; gradients accumulate locally) or nothing."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) else nullcontext()


def unwrap(module: nn.Module | None) -> nn.Module | None:
    """The bare module under a DDP wrapper (whose state-dict keys would carry a ``module.`` prefix)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def device_kind(device: str) -> str:
    """``"cuda"`` or ``"cpu"``: the kind of device a config's ``device`` asks for (``"auto"``: CUDA if
    available)."""
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_device(device: str, local_rank: int) -> torch.device:
    """The process's device for a config's ``device`` (:func:`device_kind`; CUDA: its local GPU)."""
    if device_kind(device) == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train: device 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
