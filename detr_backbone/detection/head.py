"""The detector interface: what every head gives the code that trains, runs, exports and loads it.

A head is a folder (``detection/detr/``, ``detection/deformable/``) with its detector module and a
schema, a subclass of ``HeadConfig``, registered in ``detection/registry.py``. The schema holds the
head's config (conf/model/) and answers everything that differs between heads: its criterion,
the backbone levels it reads, its extra parameter groups, the published weights it reads and the
``Architecture`` that describes them. The detector it builds follows ``Detector``. Nothing above
this layer asks which head it holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from ..joiner import Joiner
from ..nested_tensor import NestedTensor
from ..validation import require
from .criterion import BaseSetCriterion
from .postprocess import Detections
from .published import Architecture, DetectorWeights


class Detector(Protocol):
    """A head's detector module.

    ``forward`` takes a NestedTensor or a list of (3, H, W) images and returns at least ``pred_logits``
    (B, Q, C) and ``pred_boxes`` (B, Q, 4) as normalised (cx, cy, w, h), plus what its criterion reads
    (``aux_outputs`` for earlier decoder layers while ``aux_loss``). A head whose ``TRAINS_ON_TARGETS``
    is True (DINO) also takes the batch's targets in training: ``forward(samples, targets)``. ``detections`` turns those
    outputs into scores, labels and XYXY boxes in pixels, by the head's own rule; ``OUTPUTS`` says in
    words what the raw and post-processed outputs are (written into exported files).
    """

    backbone: Joiner
    num_classes: int
    aux_loss: bool
    OUTPUTS: ClassVar[Mapping[str, str]]

    def __call__(self, samples: NestedTensor | Sequence[Tensor]) -> dict[str, Any]: ...

    def detections(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> Detections: ...


@dataclass
class HeadConfig:
    """What every head's schema holds (conf/model/): ``_target_`` builds the detector from the fields its
    signature names; the costs and loss weights set the criterion. Subclasses add their fields and
    override the hooks below."""

    _target_: str = ""
    num_queries: int = 100
    enc_layers: int = 6
    dec_layers: int = 6
    nheads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    aux_loss: bool = True
    cost_class: float = 1.0  # Hungarian matching costs
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    loss_ce: float = 1.0  # loss weights
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    # torch.compile the whole detector in place (backbone.compile: the Joiner only); off: no CPU gain measured
    compile: bool = False

    POSITIVE: ClassVar[tuple[str, ...]] = ("num_queries", "dec_layers", "nheads", "dim_feedforward")
    # how the head describes the network weights fit (init_from's checks and overrides); None: no init_from
    ARCHITECTURE: ClassVar[type[Architecture] | None] = None

    def __post_init__(self) -> None:
        for name in self.POSITIVE:
            require(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be > 0")
        require(self.enc_layers >= 0, f"model.enc_layers={self.enc_layers} must be >= 0")
        require(0 <= self.dropout < 1, f"model.dropout={self.dropout} must be in [0, 1)")

    @property
    def costs(self) -> dict[str, float]:
        return {"cost_class": self.cost_class, "cost_bbox": self.cost_bbox, "cost_giou": self.cost_giou}

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"loss_ce": self.loss_ce, "loss_bbox": self.loss_bbox, "loss_giou": self.loss_giou}

    def criterion(self, num_classes: int, num_boxes_reduce: Callable[[Tensor], Tensor]) -> BaseSetCriterion:
        """The head's set loss; ``num_boxes_reduce``: see ``BaseSetCriterion``."""
        raise NotImplementedError

    def backbone_levels(self) -> list[int] | None:
        """The levels the head reads from one of our backbones whose config sets none (None: its own knobs)."""
        return None

    def parameter_groups(self, detector: nn.Module, lr: float) -> list[dict]:
        """Optimizer groups of the head's parameters that do not train at ``lr`` (the rest of the head does)."""
        return []

    @classmethod
    def published_weights(cls, content: Any, path: str | os.PathLike) -> DetectorWeights | None:
        """The weights of a file's content if it is in one of the head's published layouts, else None."""
        return None

    @classmethod
    def published_folder(cls, folder: str | os.PathLike) -> DetectorWeights | None:
        """The weights of a folder (Hugging Face's layout) if it holds this head's model, else None."""
        return None
