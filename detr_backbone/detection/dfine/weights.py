"""D-FINE's published layout: Peterande/D-FINE's released files (``dfine_n_coco.pth``, ``dfine_l_obj2coco.pth``, ...)
are ``{"model": state}`` (its reference/convert_weight.py keeps the EMA's weights only) and its training checkpoints
``{"ema": {"module": state}, "model": ..., ...}``; both are read as RT-DETRv2's are (``published.released_state``).

Its ``encoder.*`` and ``decoder.*`` keys are ours; its HGNetv2 B0 .. B5 (``backbone.stem.stem1.*``,
``backbone.stages.N.*``, with ``lab.scale`` / ``lab.bias`` on B0 .. B3) is mapped onto timm's ``hgnetv2_b0`` ..
``b5`` (``backbones.hgnetv2``). The attention's ``num_points_scale`` tells the points of each level before it is
dropped with the other derived buffers. The class heads have one row per class (80 for COCO, in COCO's category
order; 365 or 366 for Objects365, ``published.published_class_names``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import groupby
from typing import Any, ClassVar

from torch import Tensor

from ...backbones.hgnetv2 import hgnetv2_to_timm, timm_hgnetv2_size
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
from .config import DFineConfig

PUBLISHED_HEADS = 8  # D-FINE's attention heads in every release: the shapes hold heads x points, not each
# D-FINE's published fusion settings (N: 0.34 / 0.5, S: 0.5 / 0.34, M: 1.0 / 0.67, L and X: 1.0 / 1.0): the
# shapes give the widths and block counts these round to, the first that gives them is reported
PUBLISHED_EXPANSIONS = (0.34, 0.5, 0.67, 1.0)
PUBLISHED_DEPTHS = (0.34, 0.5, 0.67, 1.0)
HGNETV2_STEM = "backbone.stem.stem1.conv.weight"
DFINE_KEYS = ("decoder.pre_bbox_head.layers.0.weight", "decoder.decoder.lqe_layers.0.reg_conf.layers.0.weight")
HEAD_FIELDS = (
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
    "eval_idx",
    "reg_max",
    "reg_scale",
    "layer_scale",
    "activation",
    "mlp_activation",
)


@dataclass(frozen=True)
class DFineArchitecture:
    """The D-FINE a set of weights fits, as far as its source tells; None where it does not."""

    backbone_kind: str | None = None
    backbone_name: str | None = None
    levels: tuple[int, ...] | None = None
    dilation: bool | None = False  # D-FINE never dilates
    hidden_dim: int | None = None
    num_feature_levels: int | None = None
    enc_layers: int | None = None
    dec_layers: int | None = None
    dim_feedforward: int | None = None
    enc_dim_feedforward: int | None = None
    nheads: int | None = None
    num_points: tuple[int, ...] | None = None
    expansion: float | None = None
    depth_mult: float | None = None
    dn_number: int | None = None
    num_queries: int | None = None
    cross_attn_method: str | None = None
    eval_idx: int | None = None  # shown by wider layers after it (layer_scale > 1), else not
    reg_max: int | None = None
    reg_scale: float | None = None
    layer_scale: float | None = None
    activation: str | None = None
    mlp_activation: str | None = None

    HEAD: ClassVar[str] = "dfine"
    NO_OBJECT_ROWS: ClassVar[int] = 0
    QUERIES: ClassVar[str] = ""  # D-FINE's queries are selected from the encoder, none is learned
    CLASS_TABLES: ClassVar[Mapping[str, int]] = {"decoder.denoising_class_embed.weight": 1}  # + the padding row
    OVERRIDES: ClassVar[Mapping[str, str]] = {
        "backbone_kind": "backbone._target_",
        "backbone_name": "backbone.name",
        "levels": "backbone.levels",
        "hidden_dim": "hidden_dim",
        **{name: f"model.{name}" for name in HEAD_FIELDS if name != "dn_number"},
    }
    # what loads into any detector of the right shapes: the split of points over the levels, the bins' reach (a
    # tensor's value, loaded over the configured one), the heads, the sampling and the activations
    UNSEEN_IN_SHAPES: ClassVar[tuple[str, ...]] = (
        "nheads",
        "num_points",
        "cross_attn_method",
        "reg_scale",
        "activation",
        "mlp_activation",
    )

    def __str__(self) -> str:
        return ", ".join(
            [
                self.backbone_name or "unknown backbone",
                f"hidden_dim {self.hidden_dim}",
                f"{self.num_feature_levels} levels",
                f"{self.enc_layers} encoder + {self.dec_layers} decoder layers",
                f"points {list(self.num_points) if self.num_points else 'unknown'}",
                f"reg_max {self.reg_max}",
                f"expansion {self.expansion}",
            ]
        )

    @classmethod
    def configured(cls, config: DetectorConfig) -> DFineArchitecture:
        head = config.head
        levels = getattr(config.joiner.backbone, "levels", None)
        fields = {name: getattr(head, name) for name in HEAD_FIELDS}
        fields["num_points"] = tuple(head.num_points)
        return cls(
            **configured_backbone(config),
            levels=None if levels is None else tuple(levels),
            hidden_dim=config.joiner.hidden_dim,
            num_queries=head.num_queries,
            **fields,
        )

    def detector_config(self, num_classes: int, class_names: list[str] | None, dilation: bool | None) -> DetectorConfig:
        """The D-FINE these weights describe (the schema's defaults, D-FINE-L's, where they do not say)."""
        fields = {name: getattr(self, name) for name in HEAD_FIELDS if getattr(self, name) is not None}
        if self.num_points is not None:
            fields["num_points"] = list(self.num_points)
        head = DFineConfig(**fields, num_queries=self.num_queries or DFineConfig().num_queries)
        backbone = {
            "_target_": BACKBONE_TARGETS[self.backbone_kind or "timm"],
            "name": self.backbone_name or "hgnetv2_b4",
            "levels": list(self.levels or range(5 - head.num_feature_levels, 5)),
        }
        joiner = JoinerConfig.from_args(
            {"backbone": backbone, "position": PositionConfig(), "hidden_dim": self.hidden_dim or 256}
        )
        return DetectorConfig(joiner, head, num_classes, class_names)


def is_dfine_state(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is a whole D-FINE under D-FINE's names, on HGNetv2."""
    heads = (*DFINE_KEYS, "decoder.dec_score_head.0.weight", "encoder.input_proj.0.conv.weight")
    return all(key in state for key in heads) and HGNETV2_STEM in state


def points_per_level(scales: Tensor | None, total: int, levels: int) -> tuple[int, ...] | None:
    """Each level's sampling points: from D-FINE's ``num_points_scale`` (1 / n for each of a level's n points),
    else an even split of ``total`` (None where it is not even)."""
    if scales is None:
        return (total // levels,) * levels if total % levels == 0 else None
    counts: list[int] = []
    for scale, run in groupby(scales.tolist()):
        points = round(1 / scale)
        counts += [points] * (len(list(run)) // points)  # neighbouring levels of the same count share a run
    return tuple(counts) if len(counts) == levels and sum(counts) == total else None


def published_fit(rounded, candidates: tuple[float, ...], fallback: float) -> float:
    """The first published setting that rounds to the same network, else ``fallback``."""
    return next((value for value in candidates if rounded(value)), fallback)


def architecture_of_state(
    state: Mapping[str, Tensor], backbone_name: str | None, points_scale: Tensor | None = None
) -> DFineArchitecture:
    """What the keys and shapes of a D-FINE state dict under our names show (``points_scale``: the first layer's
    ``num_points_scale``, where the source has one)."""
    hidden = state["encoder.input_proj.0.conv.weight"].shape[0]
    levels = count_layers(state, "encoder.input_proj.")
    layers = count_layers(state, "decoder.decoder.layers.")
    points = state["decoder.decoder.layers.0.cross_attn.attention_weights.weight"].shape[0] // PUBLISHED_HEADS
    decoder_feedforward = state["decoder.decoder.layers.0.linear1.weight"].shape[0]
    aifi = state.get("encoder.encoder.0.layers.0.linear1.weight")  # absent without encoder layers
    encoder_feedforward = None if aifi is None or aifi.shape[0] == decoder_feedforward else aifi.shape[0]
    branch = state["encoder.fpn_blocks.0.cv2.0.conv1.conv.weight"].shape[0]  # round(expansion * hidden // 2)
    blocks = count_layers(state, "encoder.fpn_blocks.0.cv2.0.bottlenecks.")  # round(3 * depth_mult)
    # the layers after eval_idx are layer_scale times as wide (D-FINE's training-only layers)
    widths = [state[f"decoder.decoder.layers.{layer}.norm1.weight"].shape[0] for layer in range(layers)]
    wide = next((layer for layer, width in enumerate(widths) if width != hidden), None)
    bins = state[f"decoder.dec_bbox_head.0.layers.{count_layers(state, 'decoder.dec_bbox_head.0.layers.') - 1}.weight"]
    return DFineArchitecture(
        backbone_kind="timm",
        backbone_name=backbone_name,
        levels=tuple(range(5 - levels, 5)),
        hidden_dim=hidden,
        num_feature_levels=levels,
        enc_layers=count_layers(state, "encoder.encoder.0.layers."),
        dec_layers=layers,
        dim_feedforward=decoder_feedforward,
        enc_dim_feedforward=encoder_feedforward,
        nheads=PUBLISHED_HEADS,
        num_points=points_per_level(points_scale, points, levels),
        expansion=published_fit(lambda e: round(e * hidden // 2) == branch, PUBLISHED_EXPANSIONS, 2 * branch / hidden),
        depth_mult=published_fit(lambda d: round(3 * d) == blocks, PUBLISHED_DEPTHS, blocks / 3),
        dn_number=100 if "decoder.denoising_class_embed.weight" in state else 0,
        eval_idx=None if wide is None else wide - 1 - layers,
        reg_max=bins.shape[0] // 4 - 1,
        reg_scale=float(state["decoder.reg_scale"].reshape(-1)[0]),
        layer_scale=1.0 if wide is None else widths[wide] / hidden,
    )


class DFineCheckpointLayout:
    """D-FINE's released files and training checkpoints, read into our names."""

    source = "D-FINE checkpoint"
    described = "a D-FINE checkpoint"

    def read(self, content: Any, path: str | os.PathLike) -> DetectorWeights | None:
        found = released_state(content)
        if found is None or not is_dfine_state(found[0]):
            return None
        released, skipped = found
        state = hgnetv2_to_timm(released)
        backbone_name = timm_hgnetv2_size(state)
        state.update(
            (key, value)
            for key, value in released.items()
            if not key.startswith("backbone.") and not DERIVED_BUFFERS.fullmatch(key)
        )
        scales = released.get("decoder.decoder.layers.0.cross_attn.num_points_scale")
        architecture = architecture_of_state(state, backbone_name, scales)
        names = published_class_names(state["decoder.dec_score_head.0.weight"].shape[0])
        return DetectorWeights(self.source, os.fspath(path), state, names, architecture, skipped=skipped)


DFINE_CHECKPOINT = DFineCheckpointLayout()
