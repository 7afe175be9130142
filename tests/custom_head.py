"""A detection head of a user's own, plugged in with one registration line: the tests' proof that the
LightningModule, the loaders and the Predictor work with any head without asking which it is."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from detr_backbone import NestedTensor, nested_tensor_from_tensor_list
from detr_backbone.detection import DETR, MLP, HeadConfig, HeadRecord, HungarianMatcher, SetCriterion
from detr_backbone.detection.detr import softmax_detections
from detr_backbone.param_groups import make_group

TARGET = "tests.custom_head.PooledDetector"


class PooledDetector(nn.Module):
    """Each object query attends once to the deepest map, then DETR's class ("no object" last) and box heads."""

    TRAINS_ON_TARGETS: ClassVar[bool] = False
    OUTPUTS: ClassVar[Mapping[str, str]] = DETR.OUTPUTS  # the same outputs and post-processing as DETR's

    def __init__(
        self, backbone: nn.Module, num_classes: int, hidden_dim: int, num_queries: int, nheads: int, aux_loss: bool
    ):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.aux_loss = aux_loss  # one prediction: no earlier layers to add
        self.input_proj = nn.Conv2d(backbone.feature_channels[-1], hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.attention = nn.MultiheadAttention(hidden_dim, nheads, batch_first=True)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 2)

    def forward(self, samples) -> dict[str, Tensor]:
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, positions = self.backbone(samples)
        src, mask = features[-1].decompose()
        memory = (self.input_proj(src) + positions[-1]).flatten(2).transpose(1, 2)
        queries = self.query_embed.weight.expand(len(src), -1, -1)
        hs, _ = self.attention(queries, memory, memory, key_padding_mask=mask.flatten(1))
        return {"pred_logits": self.class_embed(hs), "pred_boxes": self.bbox_embed(hs).sigmoid()}

    def detections(self, outputs: Mapping[str, Tensor], target_sizes: Tensor):
        return softmax_detections(outputs, target_sizes)


@dataclass
class PooledHeadConfig(HeadConfig):
    _target_: str = TARGET
    num_queries: int = 5
    aux_loss: bool = False  # one prediction: nothing auxiliary
    nheads: int = 2
    eos_coef: float = 0.1
    class_lr_mult: float = 0.5  # the class layer trains at lr times this: the hook's own parameter group

    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (*HeadConfig.TRAINING_FIELDS, "eos_coef", "class_lr_mult")

    def parameter_groups(self, detector: nn.Module, lr: float) -> list[dict]:
        return make_group("class", detector.class_embed.parameters(), lr * self.class_lr_mult)


def pooled_criterion(head: PooledHeadConfig, num_classes: int, num_boxes_reduce: Callable[[Tensor], Tensor]):
    return SetCriterion(num_classes, HungarianMatcher(**head.costs), head.eos_coef, head.loss_weights, num_boxes_reduce)


# the one record a new head adds to the registry
POOLED = HeadRecord(
    name="pooled", schema=PooledHeadConfig, builder=PooledDetector, criterion=pooled_criterion, presets=()
)
