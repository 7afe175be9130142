"""Hugging Face model folders (``config.json`` beside ``model.safetensors`` or ``pytorch_model.bin``), read for
any head: each head maps the names of its model (``detr.weights.hugging_face``,
``deformable.hugging_face``) with the helpers here.

Two sets of names exist: the Hub's (``model.backbone.conv_encoder.model.*``, ``self_attn.out_proj``,
``fc1``), which every published file uses, and those transformers 5 holds in memory
(``model.backbone.model.*``, ``o_proj``, ``mlp.fc1``); the heads' renames accept both. Separate
q / k / v projections are stacked into ``nn.MultiheadAttention``'s ``in_proj`` (q, k, v in that order).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..weights import load_weights_file
from .published import DetectorWeights, PublishedArchitecture

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
PROJECTION = re.compile(r"^(.*)\.([qkv])_proj\.(weight|bias)$")
HUB_NAMES = re.compile(r"conv_encoder|\.out_proj\.|(?<!\.mlp)\.fc[12]\.")
Renames = tuple[tuple[str, str], ...]  # (pattern, replacement), applied in order, each to the result of the ones before


def hugging_face_files(folder: Path) -> tuple[Path, Path]:
    """(weights file, config.json) of a Hugging Face model folder."""
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    config = folder / CONFIG_FILE
    missing = ([" or ".join(WEIGHT_FILES)] if weights is None else []) + ([] if config.is_file() else [CONFIG_FILE])
    if missing:
        raise ValueError(
            f"{os.fspath(folder)!r} is a folder without {' and '.join(missing)}: "
            "give a Hugging Face model folder (config.json beside its weights) or a checkpoint file"
        )
    return weights, config


def read_config(config_file: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{os.fspath(config_file)!r} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{os.fspath(config_file)!r} is not a model's config (a JSON object)")
    return config


def read_folder(folder: str | os.PathLike, model_type: str) -> tuple[Mapping[str, Tensor], dict[str, Any]] | None:
    """(weights, config) of a folder whose config.json names ``model_type``; None for another model's folder."""
    weights, config_file = hugging_face_files(Path(folder))
    config = read_config(config_file)
    if config.get("model_type", "detr") != model_type:
        return None
    state = load_weights_file(weights)
    if not isinstance(state, Mapping):
        raise ValueError(f"{os.fspath(weights)!r} holds no weights (a mapping of names to tensors)")
    return state, config


def config_beside(path: str | os.PathLike, model: str) -> dict[str, Any]:
    """The config.json next to a weights file given alone, which the architecture and class names come from."""
    config_file = Path(path).parent / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(
            f"{os.fspath(config_file.parent)!r} has Hugging Face {model} weights but no {CONFIG_FILE} beside them: "
            "the architecture and the class names are read from it"
        )
    return read_config(config_file)


def renamed(state: Mapping[str, Tensor], renames: Renames) -> dict[str, Tensor]:
    """``state`` under our names: each key through ``renames``, then q / k / v projections stacked."""

    def rename(key: str) -> str:
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        return key

    return stack_projections({rename(key): value for key, value in state.items()})


def naming(state: Mapping[str, Tensor]) -> str:
    return "Hub names" if any(HUB_NAMES.search(key) for key in state) else "transformers 5 names"


def stack_projections(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``q_proj``, ``k_proj``, ``v_proj`` of each attention stacked into its ``in_proj_weight`` / ``in_proj_bias``."""
    stacked: dict[str, Tensor] = {}
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if match := PROJECTION.match(key):
            parts.setdefault((match[1], match[3]), {})[match[2]] = value
        else:
            stacked[key] = value
    for (attention, kind), projections in parts.items():
        if len(projections) == 3:
            stacked[f"{attention}.in_proj_{kind}"] = torch.cat([projections[name] for name in "qkv"])
        else:  # incomplete: left under its own names, so the load reports them
            stacked.update({f"{attention}.{name}_proj.{kind}": value for name, value in projections.items()})
    return stacked


def class_names(config: Mapping[str, Any], rows: int) -> list[str] | None:
    """The name of each class row from ``id2label``; None unless it names every row."""
    id2label = config.get("id2label") or {}
    names = [id2label.get(str(row), id2label.get(row)) for row in range(rows)]
    return None if None in names else [str(name) for name in names]


def timm_backbone_name(config: Mapping[str, Any], config_file: str | os.PathLike) -> str:
    """The timm backbone a Hugging Face detector's config names; transformers' own backbones are refused."""
    backbone = config.get("backbone_config") or {}
    backbone_type = backbone.get("model_type", "timm_backbone")
    if not config.get("use_timm_backbone", True) or backbone_type != "timm_backbone":
        raise ValueError(
            f"{os.fspath(config_file)!r}: the model uses transformers' own {backbone_type!r} backbone, whose weights "
            "have other names; only timm backbones (use_timm_backbone, as in the published models) can be read"
        )
    return config.get("backbone") or backbone.get("backbone") or "resnet50"


def same_in_encoder_and_decoder(config: Mapping[str, Any], config_file: str | os.PathLike, model: str, pairs) -> None:
    """Refuse what our transformers cannot hold: encoder and decoder sizes that differ, another activation."""
    unsupported = [
        f"{a}={config.get(a, default)} but {b}={config.get(b, default)}"
        for a, b, default in pairs
        if config.get(a, default) != config.get(b, default)
    ]
    activation = config.get("activation_function", "relu")
    if activation != "relu":
        unsupported.append(f"activation_function={activation!r} (only relu)")
    if unsupported:
        raise ValueError(
            f"{os.fspath(config_file)!r} describes a {model} our transformer cannot hold: {'; '.join(unsupported)}"
        )


def keep(state: dict[str, Tensor], architecture: PublishedArchitecture) -> dict[str, Tensor]:
    return state


@dataclass(frozen=True)
class HuggingFaceLayout:
    """How one head's Hugging Face model is read: its ``model_type``, how its weights are recognised and
    renamed, and how its ``config.json`` describes the architecture."""

    model: str  # in words: "DETR", "Deformable DETR"
    model_type: str  # config.json's
    recognised: Callable[[Mapping[str, Any]], bool]  # whether a state dict is this model's (either naming)
    markers: str  # the keys that recognise it, in words, for the error of a folder without them
    renames: Renames
    architecture: Callable[[Mapping[str, Any], str | os.PathLike], PublishedArchitecture]  # of config.json
    class_weight: str  # the key (under our names) whose rows are the classes
    completed: Callable[[dict[str, Tensor], PublishedArchitecture], dict[str, Tensor]] = (
        keep  # tensors stored once, named again
    )

    @property
    def described(self) -> str:
        return f"a Hugging Face {self.model} folder or weights file"

    def read_folder(self, folder: str | os.PathLike) -> DetectorWeights | None:
        """The weights of a folder holding this model, None if it holds another."""
        found = read_folder(folder, self.model_type)
        if found is None:
            return None
        state, config = found
        if not self.recognised(state):
            raise ValueError(f"{os.fspath(folder)!r} holds no Hugging Face {self.model} weights (no {self.markers})")
        return self.weights(state, folder, config)

    def read(self, content: Any, path: str | os.PathLike) -> DetectorWeights | None:
        """A weights file given alone, read with the config.json beside it; None if it holds another model
        (RT-DETR's and RT-DETRv2's share their names: the config's model_type tells them apart)."""
        if not isinstance(content, Mapping) or not self.recognised(content):
            return None
        config = config_beside(path, self.model)
        if config.get("model_type", "detr") != self.model_type:
            return None
        return self.weights(content, path, config)

    def weights(self, state: Mapping[str, Tensor], path: str | os.PathLike, config: dict[str, Any]) -> DetectorWeights:
        """A state dict in either naming and its config.json, under our names."""
        if config.get("model_type", "detr") != self.model_type:
            raise ValueError(
                f"the config.json of {os.fspath(path)!r} is not the config of a {self.model} model "
                f"(model_type {self.model_type!r})"
            )
        architecture = self.architecture(config, path)
        ours = self.completed(renamed(state, self.renames), architecture)
        rows = ours[self.class_weight].shape[0] - architecture.NO_OBJECT_ROWS
        source = f"Hugging Face {self.model} ({naming(state)})"
        return DetectorWeights(source, os.fspath(path), ours, class_names(config, rows), architecture)
