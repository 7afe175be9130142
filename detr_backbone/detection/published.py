"""A whole detector's weights under our names, from any source, with what the source says of the network.

Every reader (a head's published layouts, this package's own checkpoints) returns ``DetectorWeights``.
Its ``architecture`` is the head's own ``PublishedArchitecture`` (``DetrArchitecture``,
``DeformableArchitecture``, ...): what the tensors' shapes show, and what only the source records
(dilation, the number of attention heads) where it does. A head's readers depend on its schema and
on this module; ``registry`` ties them to the head.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor

from ..config import BACKBONE_TARGETS, BackboneConfig
from ..weights import BODY_KEY, DDP_PREFIX
from .building import DetectorConfig
from .coco_names import COCO_80, COCO_NAMES, UNUSED
from .objects365_names import OBJECTS365_BY_ID, OBJECTS365_NAMES

# a linear layer with one row per class (DINO's proposals have their own, enc_out_class_embed; RT-DETRv2's are
# score heads)
CLASS_HEAD = re.compile(r"(?:.+\.)?(?:(?:enc_out_)?class_embed|(?:enc|dec)_score_head)(?:\.\d+)?")
# blocks per stage (layer1..layer4) and whether they are bottlenecks -> torchvision's name
RESNET_BLOCKS: dict[tuple[tuple[int, ...], bool], str] = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
STAGE_BLOCK = re.compile(re.escape(BODY_KEY) + r"layer(\d)\.(\d+)\.")
# A published checkpoint file does not name its classes; its head's row count does. DETR-family checkpoints are
# published for COCO (80 rows, or 91: a row per id, gaps included) and Objects365 (365 rows, or D-FINE's
# 366: a row per id from 0), and no other dataset they are published for has one of these counts.
# buffers the real-time heads' released files hold but derive from their settings: the attention's point scales and
# the anchors cached for the evaluation size
DERIVED_BUFFERS = re.compile(r"(.*\.num_points_scale|decoder\.anchors|decoder\.valid_mask)")
NAMES_BY_ROW_COUNT: dict[int, tuple[str, ...]] = {
    len(names): names for names in (COCO_80, COCO_NAMES, OBJECTS365_NAMES, OBJECTS365_BY_ID)
}


class PublishedArchitecture(Protocol):
    """A head's description of the network a set of weights fits; None where the source does not tell."""

    HEAD: ClassVar[str]  # the head's name in ``registry.HEADS`` (and conf/model/)
    NO_OBJECT_ROWS: ClassVar[int]  # class rows after the real classes ("no object")
    QUERIES: ClassVar[str]  # the key of the learned object queries (init_from keeps the first model.num_queries)
    CLASS_TABLES: ClassVar[Mapping[str, int]]  # other keys with a row per class, and their extra rows
    OVERRIDES: ClassVar[Mapping[str, str]]  # field -> the override that sets it
    UNSEEN_IN_SHAPES: ClassVar[tuple[str, ...]]  # fields the tensors cannot show, checked where the source records them
    num_queries: int | None
    dilation: bool | None  # DC5; None: the source does not record it

    @classmethod
    def configured(cls, config: DetectorConfig) -> PublishedArchitecture:
        """The description of the detector ``config`` builds."""
        ...

    def detector_config(self, num_classes: int, class_names: list[str] | None, dilation: bool | None) -> DetectorConfig:
        """The config of the detector these weights fit (``dilation``: where the source does not record it)."""
        ...


@dataclass
class DetectorWeights:
    """A whole detector's tensors under our module names, with what their source says."""

    source: str  # what the file is, in words
    path: str
    state: dict[str, Tensor]
    class_names: list[str] | None  # one per class row in row order, "no object" excluded; None: not recorded
    architecture: PublishedArchitecture
    skipped: list[str] = field(default_factory=list)  # keys of the file that hold no detector weights

    @property
    def class_heads(self) -> list[str]:
        """The modules with one row per class (every copy: one per decoder layer in Deformable DETR)."""
        return [key.removesuffix(".weight") for key in self.state if CLASS_HEAD.fullmatch(key.removesuffix(".weight"))]

    @property
    def num_class_rows(self) -> int:
        """Class rows of the head, "no object" excluded."""
        return self.state[f"{self.class_heads[0]}.weight"].shape[0] - self.architecture.NO_OBJECT_ROWS

    def detector_config(self, dilation: bool | None = None) -> DetectorConfig:
        """The config of the detector these weights fit; ``dilation`` where the source does not record it
        (None: without, with a warning)."""
        if dilation is None and self.architecture.dilation is None:
            warnings.warn(
                f"{self.path}: {self.source}s do not record dilation; built without it (set dilation=true for DC5 weights)",
                stacklevel=3,
            )
        return self.architecture.detector_config(self.num_class_rows, self.class_names, dilation)


def published_class_names(rows: int) -> list[str] | None:
    """The names of a published class head's ``rows`` ("no object" excluded), None where the count does not tell."""
    names = NAMES_BY_ROW_COUNT.get(rows)
    return None if names is None else list(names)


def published_category_ids(rows: int) -> list[int]:
    """The dataset id of each of a published class head's ``rows``: COCO's ids (1..90, with gaps) for its 80
    classes, 1..365 for Objects365's 365; otherwise the row index (a row per id: COCO's 91, D-FINE's 366)."""
    if rows == len(COCO_80):
        return [index for index, name in enumerate(COCO_NAMES) if name != UNUSED]
    if rows == len(OBJECTS365_NAMES):
        return list(range(1, rows + 1))
    return list(range(rows))


def fitting_overrides(
    found: PublishedArchitecture, configured: PublishedArchitecture, names: tuple[str, ...] | None = None
) -> list[str]:
    """``key=value`` overrides that make the configured detector the one ``found`` describes, where it says."""
    overrides = []
    for name in names or tuple(found.OVERRIDES):
        wanted = getattr(found, name)
        if wanted is not None and wanted != getattr(configured, name):
            if name == "backbone_kind":
                wanted = BACKBONE_TARGETS[wanted]
            if isinstance(wanted, (list, tuple)):
                wanted = "[" + ",".join(map(str, wanted)) + "]"
            overrides.append(f"{found.OVERRIDES[name]}={str(wanted).lower() if isinstance(wanted, bool) else wanted}")
    return overrides


def count_layers(state: Mapping[str, Tensor], prefix: str) -> int:
    return len({key[len(prefix) :].partition(".")[0] for key in state if key.startswith(prefix)})


def backbone_of_state(state: Mapping[str, Tensor]) -> tuple[str | None, str | None, int | None]:
    """(kind, torchvision ResNet name, deepest stage as a main layer) of a Joiner body's keys under
    ``backbone.0.body.``; None where they are ambiguous."""
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


def published_state(content: Any) -> tuple[dict[str, Tensor], list[str]] | None:
    """A published checkpoint's model state (under ``"model"``, or the content itself) without DDP's prefix,
    and the file's other keys (optimizer, arguments); None if the content holds no such state."""
    state = content.get("model", content) if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        return None
    others = [key for key in content if key != "model"] if state is not content else []
    return {key.removeprefix(DDP_PREFIX): value for key, value in state.items()}, others


def released_state(content: Any) -> tuple[dict[str, Tensor], list[str]] | None:
    """The model state of an RT-DETR-style released file (``ema.module`` if the file has one, else ``model``:
    RT-DETRv2's and D-FINE's solvers save both), DDP's prefix dropped, and the file's other keys; None for another
    kind of file."""
    if not isinstance(content, Mapping):
        return None
    ema = content.get("ema")
    state = ema.get("module") if isinstance(ema, Mapping) else content.get("model")
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        return None
    others = [key for key in content if key != ("ema" if isinstance(ema, Mapping) else "model")]
    return {key.removeprefix(DDP_PREFIX): value for key, value in state.items()}, others


def configured_backbone(config: DetectorConfig) -> dict[str, Any]:
    """The backbone fields every architecture describes, of the detector ``config`` builds."""
    backbone = config.joiner.backbone
    return {
        "backbone_kind": backbone.kind,
        "backbone_name": getattr(backbone, "name", None),  # a backbone of the user's own has no name of ours
        "dilation": getattr(backbone, "dilation", False),
    }


def published_backbone(kind: str | None, name: str | None, dilation: bool, **levels: Any) -> BackboneConfig:
    """One of our backbones as published weights describe it (a ResNet-50 where they do not say)."""
    return BackboneConfig(
        _target_=BACKBONE_TARGETS[kind or "torchvision"], name=name or "resnet50", dilation=dilation, **levels
    )


@dataclass(frozen=True)
class CheckpointLayout:
    """A head's own published checkpoints (``{"model": state, ...}`` or the bare state, under our module names):
    how they are recognised, what their shapes say, and the key whose rows are the classes."""

    source: str  # what the file is, in words
    recognised: Callable[[Mapping[str, Any]], bool]
    architecture: Callable[[Mapping[str, Tensor]], PublishedArchitecture]
    class_weight: str

    @property
    def described(self) -> str:
        return f"a {self.source}"

    def read(self, content: Any, path: str | os.PathLike) -> DetectorWeights | None:
        """The weights of a file's content in this layout, None if it is in another."""
        found = published_state(content)
        if found is None or not self.recognised(found[0]):
            return None
        state, skipped = found
        architecture = self.architecture(state)
        rows = state[self.class_weight].shape[0] - architecture.NO_OBJECT_ROWS
        return DetectorWeights(
            self.source, os.fspath(path), state, published_class_names(rows), architecture, skipped=skipped
        )
