"""Hugging Face DETR (``DetrForObjectDetection``): a folder with ``config.json`` and its weights file.

Both namings (the Hub's and transformers 5's, ``detection.hugging_face``) map onto DETR's names.
Only timm backbones are read (``use_timm_backbone``, as in ``facebook/detr-*``): their ResNets name
their tensors as torchvision does, so they load into our ``Backbone``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ....backbones.backbone import TORCHVISION_RESNETS
from ....weights import BODY_KEY, POSITION_KEY
from ...hugging_face import HuggingFaceLayout, Renames, same_in_encoder_and_decoder, timm_backbone_name
from .source import DetrArchitecture

RENAMES: Renames = (
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


def is_hugging_face_state(state: Mapping[str, Any]) -> bool:
    return "class_labels_classifier.weight" in state and any(key.startswith("model.backbone.") for key in state)


def architecture_of_config(config: Mapping[str, Any], path: str | os.PathLike) -> DetrArchitecture:
    """What config.json says, with DetrConfig's defaults where a key is absent (older files omit some)."""
    name = timm_backbone_name(config, path)
    pairs = (("encoder_ffn_dim", "decoder_ffn_dim", 2048), ("encoder_attention_heads", "decoder_attention_heads", 8))
    same_in_encoder_and_decoder(config, path, "DETR", pairs)
    backbone = config.get("backbone_config") or {}
    return DetrArchitecture(
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


HUGGING_FACE_DETR = HuggingFaceLayout(
    model="DETR",
    model_type="detr",
    recognised=is_hugging_face_state,
    markers="class_labels_classifier, model.backbone.*",
    renames=RENAMES,
    architecture=architecture_of_config,
    class_weight="class_embed.weight",
)
