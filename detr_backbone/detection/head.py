"""The detector interface: what every head gives the code that trains, runs, exports and loads it.

A head is a folder (``detection/detr/``, ``detection/dino/``, ...) with its detector module, its
schema (a subclass of ``HeadConfig``: conf/model/'s fields and the hooks that differ between heads)
and the readers of its published weights, tied together by one ``HeadRecord`` in
``detection/registry.py``. The detector it builds follows ``Detector``. Nothing above this layer
asks which head it holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from ..image_input import InputConfig
from ..joiner import Joiner
from ..nested_tensor import NestedTensor
from ..targets import instantiate_target
from ..validation import require
from .postprocess import Detections


class Detector(Protocol):
    """A head's detector module.

    ``forward`` takes a NestedTensor or a list of (3, H, W) images and returns at least ``pred_logits``
    (B, Q, C) and ``pred_boxes`` (B, Q, 4) as normalised (cx, cy, w, h), plus what its criterion reads
    (``aux_outputs`` for earlier decoder layers while ``aux_loss``). A head whose ``TRAINS_ON_TARGETS``
    is True (DINO) also takes the batch's targets in training: ``forward(samples, targets)``.
    ``detections`` turns those outputs into scores, labels and XYXY boxes in pixels, by the head's own
    rule; ``OUTPUTS`` says in words what the raw and post-processed outputs are (written into exported files).
    """

    backbone: Joiner
    num_classes: int
    aux_loss: bool
    OUTPUTS: ClassVar[Mapping[str, str]]
    TRAINS_ON_TARGETS: ClassVar[bool]

    def __call__(self, samples: NestedTensor | Sequence[Tensor]) -> dict[str, Any]: ...

    def detections(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> Detections: ...


def layer_outputs(logits: Tensor, boxes: Tensor, aux_loss: bool) -> dict[str, Any]:
    """A decoder's outputs from every layer's (layers, B, Q, ...) logits and boxes: the last layer's, and with
    ``aux_loss`` the earlier layers' in ``aux_outputs`` (what the criterion's auxiliary losses read)."""
    out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_loss:
        out["aux_outputs"] = [
            {"pred_logits": layer_logits, "pred_boxes": layer_boxes}
            for layer_logits, layer_boxes in zip(logits[:-1], boxes[:-1])
        ]
    return out


@dataclass
class HeadConfig:
    """What every head's schema holds (conf/model/): ``_target_`` builds the detector from the schema's fields
    less ``input`` (how it takes its images) and ``TRAINING_FIELDS`` (each one a keyword of the builder: ``registry`` checks both ways); the costs and
    loss weights set the criterion. A schema's field defaults are the head's defaults, written nowhere else."""

    _target_: str = ""
    num_queries: int = 100
    aux_loss: bool = True
    cost_class: float = 1.0  # Hungarian matching costs
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    loss_ce: float = 1.0  # loss weights
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    # torch.compile the whole detector in place (backbone.compile: the Joiner only); off: no CPU gain measured
    compile: bool = False
    # how the detector takes its images (the data, the Predictor, evaluate and export read it); not the builder's
    input: InputConfig = field(default_factory=InputConfig)

    POSITIVE: ClassVar[tuple[str, ...]] = ("num_queries",)
    # fields the criterion, the optimizer or the job read, which the builder does not take
    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (
        "cost_class",
        "cost_bbox",
        "cost_giou",
        "loss_ce",
        "loss_bbox",
        "loss_giou",
        "compile",
    )

    def __post_init__(self) -> None:
        for name in self.POSITIVE:
            require(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be > 0")

    @property
    def costs(self) -> dict[str, float]:
        return {"cost_class": self.cost_class, "cost_bbox": self.cost_bbox, "cost_giou": self.cost_giou}

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"loss_ce": self.loss_ce, "loss_bbox": self.loss_bbox, "loss_giou": self.loss_giou}

    @classmethod
    def builder_fields(cls) -> list[str]:
        """The fields the builder takes as keywords: all but ``_target_``, ``input`` and ``TRAINING_FIELDS``."""
        left_out = {"_target_", "input", *cls.TRAINING_FIELDS}
        return [each.name for each in fields(cls) if each.name not in left_out]

    def build(self, backbone: Joiner, num_classes: int, hidden_dim: int) -> Detector:
        """The detector ``_target_`` builds around a Joiner whose positional maps are ``hidden_dim`` wide."""
        arguments = {name: getattr(self, name) for name in self.builder_fields()}
        return instantiate_target(
            self._target_, arguments, "model", backbone=backbone, num_classes=num_classes, hidden_dim=hidden_dim
        )

    def backbone_levels(self) -> list[int] | None:
        """The levels the head reads from one of our backbones whose config sets none (None: its own knobs)."""
        return None

    def parameter_groups(self, detector: nn.Module, lr: float) -> list[dict]:
        """Optimizer groups of the head's parameters that do not train at ``lr`` (the rest of the head does)."""
        return []


@dataclass
class TransformerHeadConfig(HeadConfig):
    """A head with an encoder-decoder transformer (DETR and its descendants)."""

    enc_layers: int = 6
    dec_layers: int = 6
    nheads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1

    POSITIVE: ClassVar[tuple[str, ...]] = (*HeadConfig.POSITIVE, "dec_layers", "nheads", "dim_feedforward")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.enc_layers >= 0, f"model.enc_layers={self.enc_layers} must be >= 0")
        require(0 <= self.dropout < 1, f"model.dropout={self.dropout} must be in [0, 1)")
