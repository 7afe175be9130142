"""A detector from its config: the Joiner, a head and the classes, built by any head.

The training job, the inference loaders and published weights all describe a detector as a
``DetectorConfig``; what a checkpoint keeps is its ``hyperparameters()``, plain values that
``registry.detector_config`` types again, once, on load (it knows the heads; this container does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..compilation import compile_in_place
from ..config import BackboneConfig, JoinerConfig
from ..joiner import build_backbone
from ..targets import check_allowed
from .head import Detector, HeadConfig


def with_head_levels(joiner: JoinerConfig, head: HeadConfig) -> JoinerConfig:
    """The Joiner config a head reads: one of our backbones without ``levels`` takes the head's levels
    where it names some (Deformable DETR: layers 2-4, as Deformable-DETR's build_backbone)."""
    levels, backbone = head.backbone_levels(), joiner.backbone
    if levels is None or not isinstance(backbone, BackboneConfig) or backbone.levels is not None:
        return joiner
    return replace(joiner, backbone=replace(backbone, levels=levels, return_interm_layers=False, main_layer=-1))


def saved_part(config: Any) -> dict[str, Any]:
    """A backbone or position config as the plain dict a checkpoint keeps (the user's own: its flat node)."""
    return config.as_node() if hasattr(config, "as_node") else asdict(config)


@dataclass
class DetectorConfig:
    """Everything that builds one detector. ``joiner`` is the one the head reads (its levels applied);
    ``class_names`` (label order) may be None where a source does not name its classes."""

    joiner: JoinerConfig
    head: HeadConfig
    num_classes: int
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes: {self.class_names}")
        self.joiner = with_head_levels(self.joiner, self.head)

    def check_targets(self, allowed: Sequence[str], source: str) -> None:
        """Refuse to build what a config from ``source`` names unless it is ours or in ``allowed``."""
        for where, target in (
            ("backbone._target_", self.joiner.backbone._target_),
            ("position._target_", self.joiner.position._target_),
            ("model._target_", self.head._target_),
        ):
            check_allowed(target, allowed, where, source)

    def uncompiled(self) -> DetectorConfig:
        """The same detector without torch.compile (the backbone's or the head's): whoever runs it decides."""
        backbone = replace(self.joiner.backbone, compile=False)
        return replace(self, joiner=replace(self.joiner, backbone=backbone), head=replace(self.head, compile=False))

    def build(self) -> Detector:
        """The detector ``head._target_`` builds around the Joiner, from the head's fields its builder takes."""
        detector = self.head.build(build_backbone(self.joiner), self.num_classes, self.joiner.hidden_dim)
        if self.head.compile:
            compile_in_place(detector)  # state dict keys unchanged
        return detector

    def hyperparameters(self) -> dict[str, Any]:
        """Plain values that rebuild this detector, without the sources of its initial weights (pretrained,
        a checkpoint file): a rebuilt detector's weights come from the state dict saved beside them."""
        backbone = {**saved_part(self.joiner.backbone), "checkpoint": None}
        if isinstance(self.joiner.backbone, BackboneConfig):
            backbone["pretrained"] = False
        joiner = {**asdict(self.joiner), "backbone": backbone, "position": saved_part(self.joiner.position)}
        return {
            "joiner": joiner,
            "head": asdict(self.head),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
        }
