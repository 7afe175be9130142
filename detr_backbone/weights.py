"""Loading weights: downloads that explain themselves, and checkpoint files of several layouts.

``load_checkpoint`` accepts
- a plain state dict of the backbone network (classifier keys such as ``fc.*`` are skipped), a timm
  model's own included (``.safetensors`` or ``.pth``: DINOv2, EVA, ImageNet-21k ViTs kept on disk),
- an ImageNet checkpoint ``{"model": state_dict}``, with or without DistributedDataParallel's
  ``module.`` prefix (stripped only from the keys that carry it),
- a whole DETR / MDETR / Deformable-DETR detector checkpoint, or a Lightning checkpoint of one:
  the keys under ``backbone.0.body.`` go to the body, those under ``backbone.1.`` to the
  learned positional table.
Files are read with ``weights_only=True`` (or as safetensors): a checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
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
        for label, keys in (
            ("missing from the checkpoint", self.missing),
            ("unexpected in the checkpoint", self.unexpected),
        ):
            if keys:
                lines.append(f"  {label}: {first_keys(keys)}")
        return "\n".join(lines)


def first_keys(keys: list[str], shown: int = 8) -> str:
    """The first ``shown`` keys, comma-separated, and how many there are when some are left out."""
    return ", ".join(keys[:shown]) + (f", ... ({len(keys)} in all)" if len(keys) > shown else "")


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte header length, then a JSON object."""
    with open(path, "rb") as stream:
        head = stream.read(9)
    if len(head) < 9 or head[8:] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < os.path.getsize(path)


def load_weights_file(path: str | os.PathLike) -> Any:
    """What a weights file holds, told apart by content: a safetensors file, or ``torch.save`` output
    read with ``weights_only=True`` (so loading cannot run code)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {os.fspath(path)!r} does not exist")
    try:
        if is_safetensors_file(path):
            return load_safetensors(path, device="cpu")
        # a stream, not the path: torch.load would go by a .safetensors suffix; Deformable-DETR's checkpoints keep
        # their argparse arguments, a Namespace of plain values, allowed without allowing any code
        with open(path, "rb") as stream, torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(stream, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, SafetensorError) as error:
        reason = str(error).strip().partition("\n")[0]
        raise ValueError(
            f"could not read checkpoint {os.fspath(path)!r} with weights_only=True: the file is truncated, "
            f"corrupt or holds more than tensors ({type(error).__name__}: {reason})"
        ) from error


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, unwrapped from ``{"model": ...}`` / ``{"state_dict": ...}``."""
    content = load_weights_file(path)
    for wrapper in ("model", "state_dict"):
        if isinstance(content, Mapping) and isinstance(content.get(wrapper), Mapping):
            content = content[wrapper]
    if not isinstance(content, Mapping) or not all(isinstance(value, Tensor) for value in content.values()):
        raise ValueError(f"checkpoint {os.fspath(path)!r} holds no state dict of tensors")
    return {key.removeprefix(DDP_PREFIX): value for key, value in content.items()}


def split_detector_state(state: Mapping[str, Tensor]) -> tuple[dict, dict, list[str]] | None:
    """(body tensors, positional-table tensors, other keys) of a detector's or a Joiner's state dict.

    None when ``state`` is neither, i.e. the state dict of the backbone network alone.
    """
    if any(key.startswith("0.body.") for key in state):  # a Joiner's own state dict
        state = {"backbone." + key: value for key, value in state.items()}
    anchor = next((key for key in state if BODY_KEY in key), None)
    if anchor is None:
        return None
    prefix = anchor[: anchor.index(BODY_KEY)]
    body_prefix, position_prefix = prefix + BODY_KEY, prefix + POSITION_KEY
    body = {key[len(body_prefix) :]: value for key, value in state.items() if key.startswith(body_prefix)}
    position = {key[len(position_prefix) :]: value for key, value in state.items() if key.startswith(position_prefix)}
    others = [key for key in state if not key.startswith((body_prefix, position_prefix))]
    return body, position, others


def match_keys(
    module: nn.Module, state: Mapping[str, Tensor], report: LoadReport, prefix: str, skip_foreign: bool
) -> dict:
    """The tensors of ``state`` that fit ``module``; the rest is recorded in ``report``.

    With ``skip_foreign``, keys of top-level modules that ``module`` does not have (a classifier
    head, say) are skipped rather than unexpected. ``num_batches_tracked`` has no place in frozen
    norms and is dropped silently, as the frozen norms themselves do.
    """
    expected = module.state_dict()
    roots = {key.split(".")[0] for key in expected}
    fitting = {}
    for key, value in state.items():
        if key in expected:
            if value.shape != expected[key].shape:
                raise CheckpointMismatchError(
                    f"{report.path}: {prefix}{key} has shape {tuple(value.shape)} in the checkpoint "
                    f"but {tuple(expected[key].shape)} in the model"
                )
            fitting[key] = value
        elif skip_foreign and key.split(".")[0] not in roots:
            report.skipped.append(prefix + key)
        elif not key.endswith("num_batches_tracked"):
            report.unexpected.append(prefix + key)
    # a live norm whose file has no count (a frozen norm's weights trained on: RT-DETR's R18) keeps its own
    report.missing += [
        prefix + key for key in expected if key not in fitting and not key.endswith("num_batches_tracked")
    ]
    report.loaded += len(fitting)
    return fitting


def as_body_keys(body: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A timm model's own keys (DINOv2, EVA, ImageNet-21k ViT files) as its ``features_only`` wrapper names them:
    ``model.`` in front (ViT's FeatureGetterNet) or the first dot flattened (``layers.0`` -> ``layers_0``);
    keys that fit as they are, or fit no way, stay as they are."""
    expected = body.state_dict().keys()
    return {
        next((name for name in (key, f"model.{key}", key.replace(".", "_", 1)) if name in expected), key): value
        for key, value in state.items()
    }


def load_checkpoint(joiner: nn.Sequential, path: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Load a checkpoint file into a Joiner's backbone body (and positional table, for detectors).

    Keys are matched before anything is copied, so a strict load that fails leaves the Joiner as it was.
    """
    state = read_state_dict(path)
    report = LoadReport(os.fspath(path))
    backbone, position = joiner[0], joiner[1]
    detector = split_detector_state(state)
    if detector is None:
        state = as_body_keys(backbone.body, state)
        loads = [(backbone.body, match_keys(backbone.body, state, report, "body.", skip_foreign=True))]
    else:
        body_state, position_state, others = detector
        report.skipped += others
        loads = [
            (backbone.body, match_keys(backbone.body, body_state, report, BODY_KEY, skip_foreign=True)),
            (position, match_keys(position, position_state, report, POSITION_KEY, skip_foreign=False)),
        ]
    if not report.ok:
        if strict:
            raise CheckpointMismatchError(f"checkpoint does not fit the model (strict loading):\n{report}")
        warnings.warn(f"non-strict checkpoint load:\n{report}", stacklevel=2)
    for module, fitting in loads:
        module.load_state_dict(fitting, strict=False)
    return report
