"""Hugging Face Deformable DETR (``DeformableDetrForObjectDetection``): a folder with ``config.json`` and its
weights file, either naming (``detection.hugging_face``), mapped onto Deformable-DETR's names.

``config.json`` decides the levels, queries, layers, hidden size, sampling points, ``with_box_refine``
and ``two_stage``; its class head has one row per class (sigmoid, no "no object" row). Only timm
backbones are read, as in the published models.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ...backbones.backbone import TORCHVISION_RESNETS
from ...weights import BODY_KEY
from ..hugging_face import HuggingFaceLayout, Renames, same_in_encoder_and_decoder, timm_backbone_name
from .weights import DeformableArchitecture, with_shared_heads

RENAMES: Renames = (
    (r"^model\.backbone\.(conv_encoder\.)?model\.", BODY_KEY),
    (r"^model\.level_embed$", "transformer.level_embed"),
    (r"^model\.input_proj\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.", r"transformer.\1."),
    (r"^model\.decoder\.(bbox_embed|class_embed)\.", r"transformer.decoder.\1."),
    (r"^model\.(encoder|decoder)\.layers\.", r"transformer.\1.layers."),
    (r"^(transformer\.encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"^(transformer\.encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"^(transformer\.decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm2."),
    (r"^(transformer\.decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm1."),
    (r"^(transformer\.decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.(mlp\.)?fc1\.", ".linear1."),
    (r"\.(mlp\.)?fc2\.", ".linear2."),
)


def is_hugging_face_state(state: Mapping[str, Any]) -> bool:
    return "model.level_embed" in state and "class_embed.0.weight" in state


def architecture_of_config(config: Mapping[str, Any], path: str | os.PathLike) -> DeformableArchitecture:
    """What config.json says, with DeformableDetrConfig's defaults where a key is absent."""
    name = timm_backbone_name(config, path)
    pairs = (("encoder_ffn_dim", "decoder_ffn_dim", 1024), ("encoder_attention_heads", "decoder_attention_heads", 8))
    same_in_encoder_and_decoder(config, path, "Deformable DETR", pairs)
    levels = config.get("num_feature_levels", 4)
    two_stage = bool(config.get("two_stage", False))
    return DeformableArchitecture(
        backbone_kind="torchvision" if name in TORCHVISION_RESNETS else "timm",
        backbone_name=name,
        levels=(2, 3, 4) if levels > 1 else (4,),
        dilation=bool(config.get("dilation", False)),
        hidden_dim=config.get("d_model", 256),
        num_feature_levels=levels,
        enc_layers=config.get("encoder_layers", 6),
        dec_layers=config.get("decoder_layers", 6),
        dim_feedforward=config.get("encoder_ffn_dim", 1024),
        nheads=config.get("encoder_attention_heads", 8),
        enc_n_points=config.get("encoder_n_points", 4),
        dec_n_points=config.get("decoder_n_points", 4),
        with_box_refine=bool(config.get("with_box_refine", False)),
        two_stage=two_stage,
        num_queries=config.get("two_stage_num_proposals", 300) if two_stage else config.get("num_queries", 300),
    )


HUGGING_FACE_DEFORMABLE_DETR = HuggingFaceLayout(
    model="Deformable DETR",
    model_type="deformable_detr",
    recognised=is_hugging_face_state,
    markers="model.level_embed, class_embed.0",
    renames=RENAMES,
    architecture=architecture_of_config,
    class_weight="class_embed.0.weight",
    completed=with_shared_heads,
)
