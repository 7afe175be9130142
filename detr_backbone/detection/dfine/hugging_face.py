"""Hugging Face D-FINE (``DFineForObjectDetection``, model_type ``d_fine``): a folder with ``config.json`` and its
weights file. The names the real-time heads share are mapped as RT-DETRv2's (``realtime.hugging_face``); D-FINE's own:
the GELAN blocks' ``conv1``, ``csp_rep1``, ``conv2``, ``csp_rep2``, ``conv3``, ``conv4`` (D-FINE's ``cv1``, ``cv2.0``,
``cv2.1``, ``cv3.0``, ``cv3.1``, ``cv4``), the down-sampling blocks' ``conv1`` / ``conv2``, the feed-forward
``mlp.layers.N``, ``pre_bbox_head``, ``lqe_layers`` and the fixed ``up`` / ``reg_scale`` (held twice by ours, once
in files). The backbone, transformers' ``HGNetV2Backbone`` (``model.backbone.model.embedder.*``,
``encoder.stages.*``), is renamed to D-FINE's HGNetv2 names and mapped onto timm's ``hgnetv2_b0`` .. ``b5``.

``config.json`` decides the backbone's size (its stem, stage blocks and widths), the widths, layers, points per
level, bins (``max_num_bins``), ``reg_scale``, ``layer_scale``, ``eval_idx``, queries, ``hidden_expansion`` and
``depth_mult``; class names come from ``id2label``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ...backbones.hgnetv2 import LAB_SIZES, hgnetv2_size, hgnetv2_to_timm
from ..hugging_face import HuggingFaceLayout, Renames
from ..realtime.hugging_face import HUGGING_FACE_BACKBONE, REALTIME_DROPPED, REALTIME_RENAMES
from .weights import PUBLISHED_HEADS, DFineArchitecture

GELAN = r"^(encoder\.(?:fpn|pan)_blocks\.\d+)\."
RENAMES: Renames = (
    *REALTIME_RENAMES,
    (GELAN + r"conv1\.", r"\1.cv1."),
    (GELAN + r"csp_rep1\.", r"\1.cv2.0."),
    (GELAN + r"conv2\.", r"\1.cv2.1."),
    (GELAN + r"csp_rep2\.", r"\1.cv3.0."),
    (GELAN + r"conv3\.", r"\1.cv3.1."),
    (GELAN + r"conv4\.", r"\1.cv4."),
    (r"^(encoder\.downsample_convs\.\d+)\.conv([12])\.", r"\1.0.cv\2."),
    (r"\.mlp\.layers\.0\.", ".linear1."),
    (r"\.mlp\.layers\.1\.", ".linear2."),
    (r"^model\.decoder\.pre_bbox_head\.", "decoder.pre_bbox_head."),
    (r"^model\.decoder\.lqe_layers\.", "decoder.decoder.lqe_layers."),
    (r"^model\.decoder\.(up|reg_scale)$", r"decoder.\1"),
)
# transformers' HGNetV2 names -> D-FINE's (which hgnetv2_to_timm reads)
BACKBONE_RENAMES: Renames = (
    (HUGGING_FACE_BACKBONE + r"embedder\.", "backbone.stem."),
    (HUGGING_FACE_BACKBONE + r"encoder\.", "backbone."),
    (r"\.convolution\.", ".conv."),
    (r"\.normalization\.", ".bn."),
)
FIXED = ("up", "reg_scale")  # the decoder's fixed parameters, shared with its layers' stack
# what our D-FINE holds one way only: config.json key, transformers' default, the value ours has
ONLY = (
    ("learn_initial_query", False, False),
    ("with_box_refine", True, True),
    ("encoder_activation_function", "gelu", "gelu"),
    ("activation_function", "silu", "silu"),
    ("decoder_activation_function", "relu", "relu"),  # transformers' box heads and quality heads are ReLU too
    ("normalize_before", False, False),
    ("decoder_offset_scale", 0.5, 0.5),
    ("top_prob_values", 4, 4),
    ("lqe_hidden_dim", 64, 64),
    ("lqe_layers", 2, 2),
    ("up", 0.5, 0.5),
)


def is_hugging_face_dfine_state(state: Mapping[str, Any]) -> bool:
    return "model.decoder.class_embed.0.weight" in state and any(
        key.startswith("model.decoder.lqe_layers.") for key in state
    )


def backbone_size(backbone: Mapping[str, Any], unsupported: list[str]) -> str | None:
    """timm's name of the HGNetV2 ``backbone_config`` describes (its problems added to ``unsupported``)."""
    if backbone.get("model_type", "hgnet_v2") != "hgnet_v2":
        unsupported.append(f"backbone_config.model_type={backbone.get('model_type')!r} (only 'hgnet_v2')")
        return None
    stem = backbone.get("stem_channels", [3, 32, 48])
    blocks = backbone.get("stage_num_blocks", [1, 1, 3, 1])
    widths = backbone.get("stage_out_channels", [128, 512, 1024, 2048])
    name = hgnetv2_size(stem[1], blocks, widths[-1])
    if name is None:
        unsupported.append(
            f"backbone_config stem_channels={stem}, stage_num_blocks={blocks}, stage_out_channels={widths} "
            "(not one of timm's hgnetv2_b0 .. b6)"
        )
    elif backbone.get("use_learnable_affine_block", False) != (name in LAB_SIZES):
        unsupported.append(
            f"backbone_config.use_learnable_affine_block={backbone.get('use_learnable_affine_block', False)} "
            f"(timm's {name} has {'' if name in LAB_SIZES else 'no '}learnable affine blocks)"
        )
    return name


def architecture_of_config(config: Mapping[str, Any], path: str | os.PathLike) -> DFineArchitecture:
    """What config.json says, with transformers' DFineConfig defaults where a key is absent."""
    backbone = config.get("backbone_config") or {}
    unsupported: list[str] = []
    name = backbone_size(backbone, unsupported)
    unsupported += [
        f"{key}={config.get(key)!r} (only {wanted!r})"
        for key, default, wanted in ONLY
        if config.get(key, default) != wanted
    ]
    heads = config.get("decoder_attention_heads", PUBLISHED_HEADS)
    if config.get("encoder_attention_heads", PUBLISHED_HEADS) != heads:
        unsupported.append("encoder_attention_heads differs from decoder_attention_heads")
    hidden = config.get("d_model", 256)
    if config.get("encoder_hidden_dim", 256) != hidden:
        unsupported.append(f"encoder_hidden_dim={config.get('encoder_hidden_dim', 256)} differs from d_model={hidden}")
    levels = len(config.get("encoder_in_channels", [512, 1024, 2048]))
    if list(config.get("encode_proj_layers", [2])) != [levels - 1]:
        unsupported.append(f"encode_proj_layers={config.get('encode_proj_layers')} (only the deepest level)")
    if config.get("num_feature_levels", 3) != levels:
        unsupported.append(
            f"num_feature_levels={config.get('num_feature_levels', 3)} differs from the encoder's levels"
        )
    stages = backbone.get("out_features", ["stage2", "stage3", "stage4"])
    if [int(stage.removeprefix("stage")) for stage in stages] != list(range(5 - levels, 5)):
        unsupported.append(f"backbone_config.out_features={stages} (only the last {levels} stages)")
    points = config.get("decoder_n_points", 4)
    points = [points] * levels if isinstance(points, int) else list(points)
    if len(points) != levels:
        unsupported.append(f"decoder_n_points={points} (one count for each of the {levels} levels)")
    if unsupported:
        raise ValueError(f"{os.fspath(path)!r} describes a D-FINE this package cannot hold: {'; '.join(unsupported)}")
    layers = config.get("decoder_layers", 6)
    return DFineArchitecture(
        backbone_kind="timm",
        backbone_name=name,
        levels=tuple(range(5 - levels, 5)),
        hidden_dim=hidden,
        num_feature_levels=levels,
        enc_layers=config.get("encoder_layers", 1),
        dec_layers=layers,
        dim_feedforward=config.get("decoder_ffn_dim", 1024),
        enc_dim_feedforward=None
        if config.get("encoder_ffn_dim", 1024) == config.get("decoder_ffn_dim", 1024)
        else config.get("encoder_ffn_dim", 1024),
        nheads=heads,
        num_points=tuple(points),
        expansion=config.get("hidden_expansion", 1.0),
        depth_mult=config.get("depth_mult", 1.0),
        dn_number=config.get("num_denoising", 100),
        num_queries=config.get("num_queries", 300),
        cross_attn_method=config.get("decoder_method", "default"),
        eval_idx=config.get("eval_idx", -1),
        reg_max=config.get("max_num_bins", 32),
        reg_scale=float(config.get("reg_scale", 4.0)),
        layer_scale=float(config.get("layer_scale", 1.0)),
        activation="relu",
        mlp_activation="relu",
    )


def with_backbone(state: dict[str, Tensor], architecture: DFineArchitecture) -> dict[str, Tensor]:
    """The backbone's tensors under timm's names, the fixed parameters under both our names, the copies and derived
    buffers dropped."""

    def dfine_name(key: str) -> str:
        for pattern, replacement in BACKBONE_RENAMES:
            key = re.sub(pattern, replacement, key)
        return key

    ours = hgnetv2_to_timm(
        {dfine_name(key): value for key, value in state.items() if re.match(HUGGING_FACE_BACKBONE, key)}
    )
    ours.update(
        (key, value)
        for key, value in state.items()
        if not re.match(HUGGING_FACE_BACKBONE, key) and not any(re.search(pattern, key) for pattern in REALTIME_DROPPED)
    )
    for name in FIXED:
        if f"decoder.{name}" in ours:
            ours[f"decoder.decoder.{name}"] = ours[f"decoder.{name}"]
    return ours


HUGGING_FACE_DFINE = HuggingFaceLayout(
    model="D-FINE",
    model_type="d_fine",
    recognised=is_hugging_face_dfine_state,
    markers="model.decoder.class_embed.0, model.decoder.lqe_layers",
    renames=RENAMES,
    architecture=architecture_of_config,
    class_weight="decoder.dec_score_head.0.weight",
    completed=with_backbone,
)
