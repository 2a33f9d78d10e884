"""Loading checkpoints into the AMSA modules: official files, wrapped or prefixed state dicts, clear errors.

Weights only ever come from local files (or in-memory state dicts): nothing is downloaded. The official
release stores plain state dicts (``restoration_mse.pth``, ``restoration.pth``, ``feature_extraction.pth``);
training frameworks often wrap them (``{'params': ...}``, ``{'state_dict': ...}``) or prefix every key with
``module.`` (``nn.DataParallel``). :func:`load_weights` accepts all of these, validates names and shapes
against the module and loads with ``strict=True``; any mismatch raises :class:`CheckpointError` listing the
first missing, unexpected and wrong-shape keys and naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["CheckpointError", "WeightsSource", "load_state_dict", "load_weights", "unwrap_state_dict"]

WeightsSource = str | os.PathLike | Mapping[str, torch.Tensor]

# Keys under which training frameworks nest the state dict (BasicSR/mmsr save {'params': ...}).
_WRAPPERS = ("params", "params_ema", "state_dict", "model", "net")
_PREFIXES = ("module.",)
_SHOW = 5  # keys listed per kind of mismatch


class CheckpointError(ValueError):
    """A checkpoint does not fit the module it is loaded into."""


def _describe(source: WeightsSource) -> str:
    return f"'{os.fspath(source)}'" if isinstance(source, (str, os.PathLike)) else "the given state dict"


def unwrap_state_dict(obj: object, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` dict inside ``obj``.

    Unwraps ``{'params'|'params_ema'|'state_dict'|...: sd}`` (repeatedly) and strips a ``module.`` prefix
    shared by every key."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            raise CheckpointError(
                f"{what}: no tensors found; expected a state dict or one wrapped under one of {_WRAPPERS}, "
                f"got keys {list(obj)[:_SHOW]}"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{what}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_state_dict(source: WeightsSource, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read ``source`` (a path to a ``.pth`` file, or a state dict) on CPU and unwrap it."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: weights file '{path}' does not exist")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    elif isinstance(source, Mapping):
        obj = source
    else:
        raise TypeError(f"{what}: weights must be a path or a state dict, got {type(source).__name__}")
    return unwrap_state_dict(obj, what=f"{what} {_describe(source)}")


def _mismatch_report(module: nn.Module, sd: Mapping[str, torch.Tensor]) -> str | None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
    parts = [f"{len(ks)} {kind} (first {min(len(ks), _SHOW)}: {ks[:_SHOW]})" for kind, ks in kinds if ks]
    return "; ".join(parts) if parts else None


def load_weights(
    module: nn.Module,
    source: WeightsSource,
    *,
    what: str,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Load ``source`` into ``module`` with ``strict=True``.

    Args:
        module: the module to fill; its ``state_dict()`` names and shapes are the contract.
        source: path to a checkpoint file or a state dict, possibly wrapped or ``module.``-prefixed.
        what: the role of the checkpoint in error messages (e.g. ``"AMSA weights"``).
        convert: maps a foreign key layout onto the module's (e.g. torchvision VGG ``features.N``); it is
            applied when none of the unwrapped keys is one of the module's.

    Raises :class:`CheckpointError` naming the file and the first missing / unexpected / wrong-shape keys.
    """
    sd = load_state_dict(source, what=what)
    if convert is not None and not set(sd) & set(module.state_dict()):
        sd = convert(sd)
    problem = _mismatch_report(module, sd)
    if problem is not None:
        raise CheckpointError(
            f"{what} from {_describe(source)} do not fit {type(module).__name__}: {problem}"
        )
    module.load_state_dict(sd, strict=True)
