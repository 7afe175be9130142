"""RT-DETRv2's published layout: lyuwenyu/RT-DETR's checkpoints (``rtdetrv2_r18vd_120e_coco_rerun_48.1.pth``),
read as its solver and ``hubconf.py`` read them: ``{"ema": {"module": state}}`` when the file has an EMA, else
``{"model": state}``.

Its ``encoder.*`` and ``decoder.*`` keys are ours; its backbone is mapped onto timm's: PResNet-vd
(``backbone.conv1.conv1_1.*``, ``backbone.res_layers.N.blocks.M.*``) onto ResNet-D (``backbones.resnet_vd``),
HGNetv2 L / X / H (``backbone.stem.stem1.*``, ``backbone.stages.N.*``) onto ``hgnetv2_b4`` / ``b5`` / ``b6``
(``backbones.hgnetv2``). Buffers derived
from the settings are dropped: the attention's ``num_points_scale`` and the anchors cached for the evaluation
size (``decoder.anchors``, ``decoder.valid_mask``). The class heads have one row per class (80 for COCO, in
COCO's category order; 365 or 366 for Objects365, ``published.published_class_names``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ...backbones.hgnetv2 import hgnetv2_to_timm, timm_hgnetv2_size
from ...backbones.resnet_vd import presnet_to_timm
from ...config import BACKBONE_TARGETS, JoinerConfig, PositionConfig
from ..building import DetectorConfig
from ..published import (
    DERIVED_BUFFERS,
    DetectorWeights,
    configured_backbone,
    count_layers,
    published_class_names,
    released_state,
)
from .config import RtDetrV2Config

PUBLISHED_HEADS = 8  # RT-DETRv2's attention heads: the shapes hold heads x points, not each
# (blocks per stage, bottleneck) -> timm's ResNet-D
PRESNET_DEPTHS = {
    ((2, 2, 2, 2), False): "resnet18d",
    ((3, 4, 6, 3), False): "resnet34d",
    ((3, 4, 6, 3), True): "resnet50d",
    ((3, 4, 23, 3), True): "resnet101d",
}
# D-FINE's decoder (its pre-head and quality heads): D-FINE's states have every key RT-DETRv2's are recognised by
DFINE_DECODER = ("decoder.pre_bbox_head.", "decoder.decoder.lqe_layers.")
PRESNET_STEM, HGNETV2_STEM = "backbone.conv1.conv1_1.conv.weight", "backbone.stem.stem1.conv.weight"


@dataclass(frozen=True)
class RtDetrV2Architecture:
    """The RT-DETRv2 a set of weights fits, as far as its source tells; None where it does not."""

    backbone_kind: str | None = None
    backbone_name: str | None = None
    levels: tuple[int, ...] | None = None
    dilation: bool | None = False  # RT-DETR never dilates
    hidden_dim: int | None = None
    num_feature_levels: int | None = None
    enc_layers: int | None = None
    dec_layers: int | None = None
    dim_feedforward: int | None = None
    enc_dim_feedforward: int | None = None
    nheads: int | None = None
    num_points: int | None = None
    expansion: float | None = None
    depth_mult: float | None = None
    dn_number: int | None = None
    num_queries: int | None = None
    cross_attn_method: str | None = None

    HEAD: ClassVar[str] = "rtdetrv2"
    NO_OBJECT_ROWS: ClassVar[int] = 0
    QUERIES: ClassVar[str] = ""  # RT-DETRv2's queries are selected from the encoder, none is learned
    CLASS_TABLES: ClassVar[Mapping[str, int]] = {"decoder.denoising_class_embed.weight": 1}  # + the padding row
    OVERRIDES: ClassVar[Mapping[str, str]] = {
        "backbone_kind": "backbone._target_",
        "backbone_name": "backbone.name",
        "levels": "backbone.levels",
        "hidden_dim": "hidden_dim",
        "num_feature_levels": "model.num_feature_levels",
        "enc_layers": "model.enc_layers",
        "dec_layers": "model.dec_layers",
        "dim_feedforward": "model.dim_feedforward",
        "enc_dim_feedforward": "model.enc_dim_feedforward",
        "nheads": "model.nheads",
        "num_points": "model.num_points",
        "expansion": "model.expansion",
        "depth_mult": "model.depth_mult",
        "cross_attn_method": "model.cross_attn_method",
    }
    UNSEEN_IN_SHAPES: ClassVar[tuple[str, ...]] = ("nheads", "num_points", "cross_attn_method")

    def __str__(self) -> str:
        return ", ".join(
            [
                self.backbone_name or "unknown backbone",
                f"hidden_dim {self.hidden_dim}",
                f"{self.num_feature_levels} levels",
                f"{self.enc_layers} encoder + {self.dec_layers} decoder layers",
                f"expansion {self.expansion}",
            ]
        )

    @classmethod
    def configured(cls, config: DetectorConfig) -> RtDetrV2Architecture:
        head = config.head
        levels = getattr(config.joiner.backbone, "levels", None)
        return cls(
            **configured_backbone(config),
            levels=None if levels is None else tuple(levels),
            hidden_dim=config.joiner.hidden_dim,
            **{name: getattr(head, name) for name in RTDETR_HEAD_FIELDS},
        )

    def detector_config(self, num_classes: int, class_names: list[str] | None, dilation: bool | None) -> DetectorConfig:
        """The RT-DETRv2 these weights describe (the schema's defaults where they do not say), on PResNet-vd with
        RT-DETR's R50 freezing (stem and BatchNorm frozen)."""
        defaults = RtDetrV2Config()
        fields = {name: getattr(self, name) for name in RTDETR_HEAD_FIELDS if getattr(self, name) is not None}
        head = RtDetrV2Config(**{**fields, "num_queries": self.num_queries or defaults.num_queries})
        backbone = {
            "_target_": BACKBONE_TARGETS[self.backbone_kind or "resnet_vd"],
            "name": self.backbone_name or "resnet50d",
            "levels": list(self.levels or (2, 3, 4)),
        }
        joiner = JoinerConfig.from_args(
            {"backbone": backbone, "position": PositionConfig(), "hidden_dim": self.hidden_dim or 256}
        )
        return DetectorConfig(joiner, head, num_classes, class_names)


RTDETR_HEAD_FIELDS = (
    "num_feature_levels",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "enc_dim_feedforward",
    "nheads",
    "num_points",
    "expansion",
    "depth_mult",
    "dn_number",
    "cross_attn_method",
)


def is_rtdetrv2_state(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is a whole RT-DETRv2 (or RT-DETR) under RT-DETR's names, on PResNet-vd or HGNetv2."""
    heads = (
        "decoder.dec_score_head.0.weight",
        "encoder.input_proj.0.conv.weight",
        "decoder.query_pos_head.layers.0.weight",
    )
    return (
        all(key in state for key in heads)
        and (PRESNET_STEM in state or HGNETV2_STEM in state)
        and not any(key.startswith(DFINE_DECODER) for key in state)
    )


def released_backbone(state: Mapping[str, Tensor]) -> tuple[str, str | None, dict[str, Tensor]]:
    """(our kind, timm's name, the tensors under our names) of a released file's backbone."""
    if HGNETV2_STEM in state:
        body = hgnetv2_to_timm(state)
        return "timm", timm_hgnetv2_size(body), body
    stages = tuple(count_layers(state, f"backbone.res_layers.{stage}.blocks.") for stage in range(4))
    bottleneck = "backbone.res_layers.0.blocks.0.branch2c.conv.weight" in state
    return "resnet_vd", PRESNET_DEPTHS.get((stages, bottleneck)), presnet_to_timm(state)


def architecture_of_state(
    state: Mapping[str, Tensor], backbone_kind: str, backbone_name: str | None
) -> RtDetrV2Architecture:
    """What the keys and shapes of an RT-DETRv2 state dict under our names show."""
    hidden = state["encoder.input_proj.0.conv.weight"].shape[0]
    levels = count_layers(state, "encoder.input_proj.")
    attention = state["decoder.decoder.layers.0.cross_attn.attention_weights.weight"].shape[0]
    blocks = count_layers(state, "encoder.fpn_blocks.0.bottlenecks.")
    decoder_feedforward = state["decoder.decoder.layers.0.linear1.weight"].shape[0]
    aifi = state.get("encoder.encoder.0.layers.0.linear1.weight")  # absent without encoder layers
    encoder_feedforward = None if aifi is None or aifi.shape[0] == decoder_feedforward else aifi.shape[0]
    return RtDetrV2Architecture(
        backbone_kind=backbone_kind,
        backbone_name=backbone_name,
        levels=tuple(range(5 - levels, 5)),
        hidden_dim=hidden,
        num_feature_levels=levels,
        enc_layers=count_layers(state, "encoder.encoder.0.layers."),
        dec_layers=count_layers(state, "decoder.decoder.layers."),
        dim_feedforward=decoder_feedforward,
        enc_dim_feedforward=encoder_feedforward,
        nheads=PUBLISHED_HEADS,
        num_points=attention // (levels * PUBLISHED_HEADS) if attention % (levels * PUBLISHED_HEADS) == 0 else None,
        expansion=state["encoder.fpn_blocks.0.conv1.conv.weight"].shape[0] / hidden,
        depth_mult=blocks / 3,
        dn_number=100 if "decoder.denoising_class_embed.weight" in state else 0,
        cross_attn_method=None,
    )


class RtDetrV2CheckpointLayout:
    """RT-DETRv2's released checkpoints, read into our names."""

    source = "RT-DETRv2 checkpoint"
    described = "an RT-DETRv2 checkpoint"

    def read(self, content: Any, path: str | os.PathLike) -> DetectorWeights | None:
        found = released_state(content)
        if found is None or not is_rtdetrv2_state(found[0]):
            return None
        released, skipped = found
        backbone_kind, backbone_name, state = released_backbone(released)
        state.update(
            (key, value)
            for key, value in released.items()
            if not key.startswith("backbone.") and not DERIVED_BUFFERS.fullmatch(key)
        )
        architecture = architecture_of_state(state, backbone_kind, backbone_name)
        rows = state["decoder.dec_score_head.0.weight"].shape[0]
        names = published_class_names(rows)
        return DetectorWeights(self.source, os.fspath(path), state, names, architecture, skipped=skipped)


RTDETRV2_CHECKPOINT = RtDetrV2CheckpointLayout()
