"""Hugging Face DETR (``DetrForObjectDetection``): a folder with ``config.json`` and its weights file.

Two sets of names exist: the Hub's (``model.backbone.conv_encoder.model.*``, ``self_attn.out_proj``,
``fc1``), which every published file uses, and those transformers 5 holds in memory
(``model.backbone.model.*``, ``o_proj``, ``mlp.fc1``). Both map onto DETR's names; the separate
q / k / v projections are stacked into ``nn.MultiheadAttention``'s ``in_proj`` (q, k, v in that
order). Only timm backbones are read (``use_timm_backbone``, as in ``facebook/detr-*``): their
ResNets name their tensors as torchvision does, so they load into our ``Backbone``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ....backbone import TORCHVISION_RESNETS
from ....weights import BODY_KEY, POSITION_KEY, load_weights_file
from .source import Architecture, DetectorWeights

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"

# applied in order, each to the result of the ones before
RENAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.backbone\.(conv_encoder\.)?model\.", BODY_KEY),
    (r"^model\.(backbone\.)?position_embedding\.row_embeddings\.", POSITION_KEY + "row_embed."),
    (r"^model\.(backbone\.)?position_embedding\.column_embeddings\.", POSITION_KEY + "col_embed."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.(encoder|decoder)\.layers\.", r"transformer.\1.layers."),
    (r"^(transformer\.encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"^(transformer\.encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"^(transformer\.decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"^(transformer\.decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
    (r"^(transformer\.decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"\.encoder_attn\.", ".multihead_attn."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.(mlp\.)?fc1\.", ".linear1."),
    (r"\.(mlp\.)?fc2\.", ".linear2."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
)
PROJECTION = re.compile(r"^(.*)\.([qkv])_proj\.(weight|bias)$")
HUB_NAMES = re.compile(r"conv_encoder|\.out_proj\.|(?<!\.mlp)\.fc[12]\.")


def is_hugging_face_state(state: Mapping[str, Any]) -> bool:
    return "class_labels_classifier.weight" in state and any(key.startswith("model.backbone.") for key in state)


def hugging_face_files(folder: Path) -> tuple[Path, Path]:
    """(weights file, config.json) of a Hugging Face model folder."""
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    config = folder / CONFIG_FILE
    missing = ([" or ".join(WEIGHT_FILES)] if weights is None else []) + ([] if config.is_file() else [CONFIG_FILE])
    if missing:
        raise ValueError(
            f"{os.fspath(folder)!r} is a folder without {' and '.join(missing)}: "
            "give a Hugging Face DETR folder, or a checkpoint file"
        )
    return weights, config


def read_hugging_face_folder(folder: str | os.PathLike) -> DetectorWeights:
    weights, config = hugging_face_files(Path(folder))
    state = load_weights_file(weights)
    if not isinstance(state, Mapping) or not is_hugging_face_state(state):
        raise ValueError(
            f"{os.fspath(weights)!r} holds no Hugging Face DETR weights (no class_labels_classifier, model.backbone.*)"
        )
    return hugging_face_weights(state, folder, config)


def hugging_face_weights(state: Mapping[str, Tensor], path: str | os.PathLike, config_file: Path) -> DetectorWeights:
    """A Hugging Face DETR state dict (either naming) and its config.json, as DETR's weights."""
    if not config_file.is_file():
        raise ValueError(
            f"{os.fspath(config_file.parent)!r} has Hugging Face DETR weights but no {CONFIG_FILE} beside them: "
            "the architecture and the class names are read from it"
        )
    config = read_config(config_file)
    renamed = {rename(key): value for key, value in state.items()}
    detr_state = stack_projections(renamed)
    naming = "Hub names" if any(HUB_NAMES.search(key) for key in state) else "transformers 5 names"
    return DetectorWeights(
        f"Hugging Face DETR ({naming})",
        os.fspath(path),
        detr_state,
        class_names(config, detr_state["class_embed.weight"].shape[0] - 1),
        architecture_of_config(config, config_file),
    )


def read_config(config_file: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{os.fspath(config_file)!r} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or config.get("model_type", "detr") != "detr":
        raise ValueError(f"{os.fspath(config_file)!r} is not the config of a DETR model (model_type 'detr')")
    return config


def rename(key: str) -> str:
    for pattern, replacement in RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


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


def architecture_of_config(config: Mapping[str, Any], config_file: Path) -> Architecture:
    """What config.json says, with DetrConfig's defaults where a key is absent (older files omit some)."""
    backbone = config.get("backbone_config") or {}
    backbone_type = backbone.get("model_type", "timm_backbone")
    if not config.get("use_timm_backbone", True) or backbone_type != "timm_backbone":
        raise ValueError(
            f"{os.fspath(config_file)!r}: the model uses transformers' own {backbone_type!r} backbone, whose weights "
            "have other names; only timm backbones (use_timm_backbone, as in facebook/detr-*) can be read"
        )
    unsupported = [
        f"{a}={config.get(a, default)} but {b}={config.get(b, default)}"
        for a, b, default in (
            ("encoder_ffn_dim", "decoder_ffn_dim", 2048),
            ("encoder_attention_heads", "decoder_attention_heads", 8),
        )
        if config.get(a, default) != config.get(b, default)
    ]
    if config.get("activation_function", "relu") != "relu":
        unsupported.append(f"activation_function={config['activation_function']!r} (only relu)")
    if unsupported:
        raise ValueError(
            f"{os.fspath(config_file)!r} describes a DETR our transformer cannot hold: {'; '.join(unsupported)}"
        )
    name = config.get("backbone") or backbone.get("backbone") or "resnet50"
    return Architecture(
        backbone_kind="torchvision" if name in TORCHVISION_RESNETS else "timm",
        backbone_name=name,
        main_layer=-1,
        dilation=bool(config.get("dilation")) or backbone.get("output_stride") == 16,
        position=config.get("position_embedding_type", "sine"),
        hidden_dim=config.get("d_model", 256),
        enc_layers=config.get("encoder_layers", 6),
        dec_layers=config.get("decoder_layers", 6),
        dim_feedforward=config.get("encoder_ffn_dim", 2048),
        nheads=config.get("encoder_attention_heads", 8),
        pre_norm=False,
        num_queries=config.get("num_queries", 100),
    )
