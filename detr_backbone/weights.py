"""Loading weights: downloads that explain themselves, and checkpoint files of several layouts.

``load_checkpoint`` accepts
- a plain state dict of the backbone network (classifier keys such as ``fc.*`` are skipped),
- an ImageNet checkpoint ``{"model": state_dict}``, with or without DistributedDataParallel's
  ``module.`` prefix (stripped only from the keys that carry it),
- a whole DETR / MDETR / Deformable-DETR detector checkpoint, or a Lightning checkpoint of one:
  the keys under ``backbone.0.body.`` go to the body, those under ``backbone.1.`` to the
  learned positional table.
Files are read with ``weights_only=True``: a checkpoint cannot run code when it is loaded.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

DDP_PREFIX = "module."
BODY_KEY = "backbone.0.body."
POSITION_KEY = "backbone.1."


@contextlib.contextmanager
def explain_download_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        raise RuntimeError(
            f"could not fetch {what} ({type(error).__name__}: {error}). Without network access, set "
            "pretrained=false and load a local file with backbone.checkpoint=<path>, or place the file "
            "in the torch hub / Hugging Face cache beforehand"
        ) from error


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys do not fit the model (raised by strict loading)."""


@dataclass
class LoadReport:
    """What a checkpoint load did: tensors loaded, model keys left missing, checkpoint keys not used."""

    path: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        lines = [f"{self.path}: loaded {self.loaded} tensors, skipped {len(self.skipped)} keys of other modules"]
        for label, keys in (("missing from the checkpoint", self.missing), ("unexpected in the checkpoint", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                lines.append(f"  {label}: {shown}")
        return "\n".join(lines)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, unwrapped from ``{"model": ...}`` / ``{"state_dict": ...}``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {os.fspath(path)!r} does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise ValueError(
            f"could not read checkpoint {os.fspath(path)!r} with weights_only=True: the file is truncated, "
            f"corrupt or holds more than tensors ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error
    for wrapper in ("model", "state_dict"):
        if isinstance(content, Mapping) and isinstance(content.get(wrapper), Mapping):
            content = content[wrapper]
    if not isinstance(content, Mapping) or not all(isinstance(value, Tensor) for value in content.values()):
        raise ValueError(f"checkpoint {os.fspath(path)!r} holds no state dict of tensors")
    return {key.removeprefix(DDP_PREFIX): value for key, value in content.items()}


def split_detector_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
    """(body, positional table) tensors of a detector's state dict, or None if it is not a detector's."""
    anchor = next((key for key in state if BODY_KEY in key), None)
    if anchor is None:
        return None
    prefix = anchor[: anchor.index(BODY_KEY)]
    body_prefix, position_prefix = prefix + BODY_KEY, prefix + POSITION_KEY
    body = {key[len(body_prefix):]: value for key, value in state.items() if key.startswith(body_prefix)}
    position = {key[len(position_prefix):]: value for key, value in state.items() if key.startswith(position_prefix)}
    return body, position


def load_into(module: nn.Module, state: Mapping[str, Tensor], report: LoadReport, prefix: str = "") -> None:
    """Load ``state`` into ``module``; keys of top-level modules it does not have are skipped, not errors."""
    children = {name for name, _ in module.named_children()} | {name for name, _ in module.named_parameters(recurse=False)}
    children |= {name for name, _ in module.named_buffers(recurse=False)}
    kept = {key: value for key, value in state.items() if key.split(".")[0] in children}
    report.skipped += [prefix + key for key in state if key not in kept]
    try:
        result = module.load_state_dict(kept, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointMismatchError(f"{report.path}: {error}") from error
    report.missing += [prefix + key for key in result.missing_keys]
    report.unexpected += [prefix + key for key in result.unexpected_keys]
    report.loaded += len(kept.keys() & module.state_dict().keys())


def load_checkpoint(joiner: nn.Sequential, path: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Load a checkpoint file into a Joiner's backbone body (and positional table, for detectors)."""
    state = read_state_dict(path)
    report = LoadReport(os.fspath(path))
    backbone, position = joiner[0], joiner[1]
    detector = split_detector_state(state)
    if detector is None:
        load_into(backbone.body, state, report, prefix="body.")
    else:
        body_state, position_state = detector
        load_into(backbone.body, body_state, report, prefix=BODY_KEY)
        load_into(position, position_state, report, prefix=POSITION_KEY)
    if not report.ok:
        if strict:
            raise CheckpointMismatchError(f"checkpoint does not fit the model (strict loading):\n{report}")
        warnings.warn(f"non-strict checkpoint load:\n{report}", stacklevel=2)
    return report
