"""A detector's weights under DETR's key names, with what they say about the network they fit.

Every reader (DETR's checkpoints, Hugging Face folders, this package's own checkpoints) returns a
``DetectorWeights``. What the tensors' shapes show is inferred here; what they cannot show
(dilation, the number of heads) is only known where the source records it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from ....config import BACKBONE_TARGETS, POSITION_TARGETS, BackboneConfig, JoinerConfig, PositionConfig
from ....weights import BODY_KEY, POSITION_KEY

if TYPE_CHECKING:
    from ...building import DetectorConfig

# blocks per stage (layer1..layer4) and whether they are bottlenecks -> torchvision's name
RESNET_BLOCKS: dict[tuple[tuple[int, ...], bool], str] = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
STAGE_BLOCK = re.compile(re.escape(BODY_KEY) + r"layer(\d)\.(\d+)\.")


@dataclass(frozen=True)
class Architecture:
    """The detector a set of weights fits, as far as its source tells; None where it does not."""

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


@dataclass
class DetectorWeights:
    """A whole DETR's tensors under our DETR's names, with what its source says (``PublishedWeights``)."""

    source: str  # what the file is, in words
    path: str
    state: dict[str, Tensor]
    class_names: list[str] | None  # one per class row in row order, "no object" excluded; None: not recorded
    architecture: Architecture
    skipped: list[str] = field(default_factory=list)  # keys of the file that hold no detector weights

    @property
    def num_class_rows(self) -> int:
        """Class rows of the head, "no object" excluded."""
        return self.state["class_embed.weight"].shape[0] - 1

    def detector_config(self, dilation: bool | None = None) -> DetectorConfig:
        """The DETR these weights describe; ``dilation`` None: as recorded, else without (with a warning)."""
        from ...building import DetectorConfig  # both import these layouts, so they are imported when used
        from ..config import DetrConfig

        arch = self.architecture
        if dilation is None and arch.dilation is None:
            warnings.warn(
                f"{self.path}: {self.source}s do not record dilation; built without it (set dilation=true for DC5 weights)",
                stacklevel=3,
            )
        backbone = BackboneConfig(
            _target_=BACKBONE_TARGETS[arch.backbone_kind or "torchvision"],
            name=arch.backbone_name or "resnet50",
            dilation=bool(arch.dilation if dilation is None else dilation),
            main_layer=-1 if arch.main_layer is None else arch.main_layer,
        )
        position = PositionConfig(_target_=POSITION_TARGETS[arch.position or "sine"])
        head = DetrConfig(
            num_queries=arch.num_queries,
            enc_layers=arch.enc_layers,
            dec_layers=arch.dec_layers,
            nheads=arch.nheads or DetrConfig.nheads,
            dim_feedforward=arch.dim_feedforward or DetrConfig.dim_feedforward,
            pre_norm=bool(arch.pre_norm),
            dropout=0.0,
        )
        joiner = JoinerConfig(backbone, position, hidden_dim=arch.hidden_dim)
        return DetectorConfig(joiner, head, self.num_class_rows, self.class_names)


def is_detr_state(state: Mapping[str, object]) -> bool:
    """Whether ``state`` is a whole DETR under DETR's own names."""
    heads = ("class_embed.weight", "query_embed.weight", "input_proj.weight")
    return all(key in state for key in heads) and any(key.startswith(BODY_KEY) for key in state)


def architecture_of_state(state: Mapping[str, Tensor]) -> Architecture:
    """What the keys and shapes of a DETR state dict show about the network (dilation and heads they cannot)."""
    queries = state["query_embed.weight"]
    kind, name, main_layer = _backbone_of_state(state)
    return Architecture(
        backbone_kind=kind,
        backbone_name=name,
        main_layer=main_layer,
        position="learned" if POSITION_KEY + "row_embed.weight" in state else "sine",
        hidden_dim=queries.shape[1],
        enc_layers=_count_layers(state, "transformer.encoder.layers."),
        dec_layers=_count_layers(state, "transformer.decoder.layers."),
        dim_feedforward=next((v.shape[0] for k, v in state.items() if k.endswith(".linear1.weight")), None),
        pre_norm="transformer.encoder.norm.weight" in state,
        num_queries=queries.shape[0],
    )


def _count_layers(state: Mapping[str, Tensor], prefix: str) -> int:
    return len({key[len(prefix) :].partition(".")[0] for key in state if key.startswith(prefix)})


def _backbone_of_state(state: Mapping[str, Tensor]) -> tuple[str | None, str | None, int | None]:
    """(kind, torchvision ResNet name, main layer) of the body's keys; None where they are ambiguous."""
    blocks: dict[int, int] = {}
    for key in state:
        if match := STAGE_BLOCK.match(key):
            stage, block = int(match[1]), int(match[2])
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    if not blocks:
        return None, None, None
    # frozen BatchNorm keeps running statistics; GroupNorm has none
    kind = "torchvision" if BODY_KEY + "bn1.running_mean" in state else "groupnorm"
    counts = tuple(blocks[stage] for stage in sorted(blocks))
    bottleneck = BODY_KEY + "layer1.0.conv3.weight" in state
    names = [
        name for (full, deep), name in RESNET_BLOCKS.items() if deep == bottleneck and full[: len(counts)] == counts
    ]
    return kind, names[0] if len(names) == 1 else None, max(blocks) - 5
