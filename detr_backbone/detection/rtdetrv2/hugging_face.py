"""Hugging Face RT-DETRv2 (``RTDetrV2ForObjectDetection``) and RT-DETR (``RTDetrForObjectDetection``, whose
decoder is RT-DETRv2's with bilinear sampling and the same names): a folder with ``config.json`` and its weights file,
either naming (``detection.hugging_face``: the Hub's ``encoder.encoder.N``, ``out_proj``, ``fc1``, or transformers
5's ``encoder.aifi.N``, ``o_proj``, ``mlp.fc1``), mapped onto RT-DETRv2's names; the ResNet-D backbone
(``RTDetrResNetBackbone``) onto timm's (``backbones.resnet_vd``).

``config.json`` decides the backbone's depth, the widths, layers, heads, points, queries, ``hidden_expansion``
and ``decoder_method``; class names come from ``id2label``. The class and box heads are held twice in memory
(``class_embed`` at the top and under ``model.decoder``), once in files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from torch import Tensor

from ...backbones.resnet_vd import hugging_face_resnet_to_timm
from ..hugging_face import HuggingFaceLayout
from ..realtime.hugging_face import HUGGING_FACE_BACKBONE, REALTIME_DROPPED, REALTIME_RENAMES
from .weights import PRESNET_DEPTHS, RtDetrV2Architecture


def is_hugging_face_state(state: Mapping[str, Any]) -> bool:
    return "model.decoder.class_embed.0.weight" in state and any(
        key.startswith("model.encoder_input_proj.") for key in state
    )


def architecture_of_config(config: Mapping[str, Any], path: str | os.PathLike) -> RtDetrV2Architecture:
    """What config.json says, with RTDetrV2Config's defaults where a key is absent."""
    backbone = config.get("backbone_config") or {}
    unsupported = []
    if backbone.get("model_type", "rt_detr_resnet") != "rt_detr_resnet":
        unsupported.append(f"backbone model_type {backbone.get('model_type')!r} (only rt_detr_resnet)")
    for key, default, wanted in (
        ("learn_initial_query", False, False),
        ("encoder_activation_function", "gelu", "gelu"),
        ("activation_function", "silu", "silu"),
        ("decoder_activation_function", "relu", "relu"),
        ("normalize_before", False, False),
    ):
        if config.get(key, default) != wanted:
            unsupported.append(f"{key}={config.get(key)!r} (only {wanted!r})")
    if config.get("encoder_attention_heads", 8) != config.get("decoder_attention_heads", 8):
        unsupported.append("encoder_attention_heads differs from decoder_attention_heads")
    levels = len(config.get("encoder_in_channels", [512, 1024, 2048]))
    if list(config.get("encode_proj_layers", [2])) != [levels - 1]:
        unsupported.append(f"encode_proj_layers={config.get('encode_proj_layers')} (only the deepest level)")
    if config.get("num_feature_levels", 3) != levels:
        unsupported.append("num_feature_levels differs from the encoder's levels")
    if unsupported:
        raise ValueError(
            f"{os.fspath(path)!r} describes an RT-DETRv2 this package cannot hold: {'; '.join(unsupported)}"
        )
    depths = tuple(backbone.get("depths", [3, 4, 6, 3]))
    bottleneck = backbone.get("layer_type", "bottleneck") == "bottleneck"
    return RtDetrV2Architecture(
        backbone_kind="resnet_vd",
        backbone_name=PRESNET_DEPTHS.get((depths, bottleneck)),
        levels=tuple(range(5 - levels, 5)),
        hidden_dim=config.get("d_model", 256),
        num_feature_levels=levels,
        enc_layers=config.get("encoder_layers", 1),
        dec_layers=config.get("decoder_layers", 6),
        dim_feedforward=config.get("decoder_ffn_dim", 1024),
        enc_dim_feedforward=None
        if config.get("encoder_ffn_dim", 1024) == config.get("decoder_ffn_dim", 1024)
        else config.get("encoder_ffn_dim", 1024),
        nheads=config.get("decoder_attention_heads", 8),
        num_points=config.get("decoder_n_points", 4),
        expansion=config.get("hidden_expansion", 1.0),
        depth_mult=1.0,  # transformers' fusion blocks always hold three RepVGG blocks
        dn_number=config.get("num_denoising", 100),
        num_queries=config.get("num_queries", 300),
        cross_attn_method=config.get("decoder_method", "default"),
    )


def with_backbone(state: dict[str, Tensor], architecture: RtDetrV2Architecture) -> dict[str, Tensor]:
    """The backbone's tensors under timm's names, and the copies and derived buffers dropped."""
    ours = hugging_face_resnet_to_timm(
        {re.sub(HUGGING_FACE_BACKBONE, "backbone.", key): value for key, value in state.items()}, "backbone."
    )
    ours.update(
        (key, value)
        for key, value in state.items()
        if not re.match(HUGGING_FACE_BACKBONE, key) and not any(re.search(pattern, key) for pattern in REALTIME_DROPPED)
    )
    return ours


HUGGING_FACE_RTDETRV2 = HuggingFaceLayout(
    model="RT-DETRv2",
    model_type="rt_detr_v2",
    recognised=is_hugging_face_state,
    markers="model.decoder.class_embed.0, model.encoder_input_proj",
    renames=REALTIME_RENAMES,
    architecture=architecture_of_config,
    class_weight="decoder.dec_score_head.0.weight",
    completed=with_backbone,
)


HUGGING_FACE_RTDETR = replace(HUGGING_FACE_RTDETRV2, model="RT-DETR", model_type="rt_detr")
