"""What a DETR's weights say about the network they fit: ``DetrArchitecture``, from the shapes of a state dict
(DETR's own names) or from what a source records; what shapes cannot show (dilation, the number of
heads) is only known where the source records it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ....config import POSITION_TARGETS, JoinerConfig, PositionConfig
from ....weights import BODY_KEY, POSITION_KEY
from ...building import DetectorConfig
from ...published import backbone_of_state, configured_backbone, count_layers, published_backbone
from ..config import DetrConfig


def last_level(main_layer: int | None) -> int | None:
    """``backbone.main_layer`` counted from the end (0..3 and -4..-1 both index the four levels)."""
    return None if main_layer is None else main_layer % 4 - 4


@dataclass(frozen=True)
class DetrArchitecture:
    """The DETR a set of weights fits, as far as its source tells; None where it does not."""

    backbone_kind: str | None = None  # torchvision | groupnorm | timm
    backbone_name: str | None = None
    main_layer: int | None = None  # the level the backbone body ends at (-1: layer4)
    dilation: bool | None = None
    position: str | None = None  # sine | learned
    hidden_dim: int | None = None
    enc_layers: int | None = None
    dec_layers: int | None = None
    dim_feedforward: int | None = None
    nheads: int | None = None
    pre_norm: bool | None = None
    num_queries: int | None = None

    HEAD: ClassVar[str] = "detr"
    NO_OBJECT_ROWS: ClassVar[int] = 1
    QUERIES: ClassVar[str] = "query_embed.weight"
    CLASS_TABLES: ClassVar[Mapping[str, int]] = {}
    # num_queries is absent: a checkpoint may have more queries than the run keeps
    OVERRIDES: ClassVar[Mapping[str, str]] = {
        "backbone_kind": "backbone._target_",
        "backbone_name": "backbone.name",
        "main_layer": "backbone.main_layer",
        "dilation": "dilation",
        "position": "position",
        "hidden_dim": "hidden_dim",
        "enc_layers": "model.enc_layers",
        "dec_layers": "model.dec_layers",
        "dim_feedforward": "model.dim_feedforward",
        "nheads": "model.nheads",
        "pre_norm": "model.pre_norm",
    }
    UNSEEN_IN_SHAPES: ClassVar[tuple[str, ...]] = ("dilation", "nheads")

    def __str__(self) -> str:
        parts = [
            self.backbone_name or "unknown backbone",
            f"hidden_dim {self.hidden_dim}",
            f"{self.enc_layers} encoder + {self.dec_layers} decoder layers",
            f"{self.num_queries} queries",
        ]
        if self.dilation is not None:
            parts.insert(1, "DC5" if self.dilation else "no dilation")
        return ", ".join(parts)

    @classmethod
    def configured(cls, config: DetectorConfig) -> DetrArchitecture:
        backbone, head = config.joiner.backbone, config.head
        return cls(
            **configured_backbone(config),
            main_layer=-1 if backbone.return_interm_layers else last_level(backbone.main_layer),
            position=config.joiner.position.kind,
            hidden_dim=config.joiner.hidden_dim,
            enc_layers=head.enc_layers,
            dec_layers=head.dec_layers,
            dim_feedforward=head.dim_feedforward,
            nheads=head.nheads,
            pre_norm=head.pre_norm,
            num_queries=head.num_queries,
        )

    def detector_config(self, num_classes: int, class_names: list[str] | None, dilation: bool | None) -> DetectorConfig:
        """The DETR these weights describe; ``dilation`` None: as recorded, else without."""
        backbone = published_backbone(
            self.backbone_kind,
            self.backbone_name,
            bool(self.dilation if dilation is None else dilation),
            main_layer=-1 if self.main_layer is None else self.main_layer,
        )
        position = PositionConfig(_target_=POSITION_TARGETS[self.position or "sine"])
        head = DetrConfig(
            num_queries=self.num_queries,
            enc_layers=self.enc_layers,
            dec_layers=self.dec_layers,
            nheads=self.nheads or DetrConfig.nheads,
            dim_feedforward=self.dim_feedforward or DetrConfig.dim_feedforward,
            pre_norm=bool(self.pre_norm),
            dropout=0.0,
        )
        joiner = JoinerConfig(backbone, position, hidden_dim=self.hidden_dim)
        return DetectorConfig(joiner, head, num_classes, class_names)


def is_detr_state(state: Mapping[str, object]) -> bool:
    """Whether ``state`` is a whole DETR under DETR's own names."""
    heads = ("class_embed.weight", "query_embed.weight", "input_proj.weight")
    return all(key in state for key in heads) and any(key.startswith(BODY_KEY) for key in state)


def architecture_of_state(state: Mapping[str, Tensor]) -> DetrArchitecture:
    """What the keys and shapes of a DETR state dict show about the network (dilation and heads they cannot)."""
    queries = state["query_embed.weight"]
    kind, name, main_layer = backbone_of_state(state)
    return DetrArchitecture(
        backbone_kind=kind,
        backbone_name=name,
        main_layer=main_layer,
        position="learned" if POSITION_KEY + "row_embed.weight" in state else "sine",
        hidden_dim=queries.shape[1],
        enc_layers=count_layers(state, "transformer.encoder.layers."),
        dec_layers=count_layers(state, "transformer.decoder.layers."),
        dim_feedforward=next((v.shape[0] for k, v in state.items() if k.endswith(".linear1.weight")), None),
        pre_norm="transformer.encoder.norm.weight" in state,
        num_queries=queries.shape[0],
    )
