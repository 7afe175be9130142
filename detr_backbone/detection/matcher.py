"""The one-to-one assignment of predictions to ground-truth objects (Hungarian matching) every head shares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]


class BaseHungarianMatcher(nn.Module):
    """Per image, the assignment of queries to targets that minimises

    ``cost_bbox * L1(boxes) + cost_class * class_cost + cost_giou * -GIoU(boxes)``.

    Each head's subclass gives its ``class_cost``. Every target gets exactly one query; the others
    are left unmatched.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0: every assignment would be equally good")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    def cost_matrix(self, logits: Tensor, boxes: Tensor, target_labels: Tensor, target_boxes: Tensor) -> Tensor:
        """(queries, targets) costs from logits (Q, K) and cxcywh boxes (Q, 4), queries of any images."""
        class_cost = self.class_cost(logits.float(), target_labels)
        boxes, target_boxes = boxes.float(), target_boxes.float()
        bbox_cost = torch.cdist(boxes, target_boxes, p=1)
        giou_cost = -generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
        )
        return self.cost_bbox * bbox_cost + self.cost_class * class_cost + self.cost_giou * giou_cost

    def class_cost(self, logits: Tensor, target_labels: Tensor) -> Tensor:
        """(queries, targets) class costs from logits (Q, K) of queries and the targets' labels."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Indices:
        """For each image, (query indices, target indices) as int64 tensors of equal length, on the CPU."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        batch, num_queries = logits.shape[:2]
        if len(targets) != batch:
            raise ValueError(f"the matcher got {len(targets)} targets for a batch of {batch} images")
        # One cost matrix for every query against every target of the batch (a few large ops instead
        # of many small ones per image); each image then keeps its own block.
        cost = self.cost_matrix(
            logits.flatten(0, 1),
            boxes.flatten(0, 1),
            torch.cat([target["labels"] for target in targets]),
            torch.cat([target["boxes"] for target in targets]),
        )
        cost = cost.view(batch, num_queries, -1).cpu()
        if not torch.isfinite(cost).all():
            raise ValueError("the matching cost has NaN or inf entries: the predictions or target boxes are not finite")
        blocks = cost.split([len(target["labels"]) for target in targets], dim=-1)
        indices = []
        for image, block in enumerate(blocks):
            queries, objects = linear_sum_assignment(block[image].numpy())
            indices.append((torch.as_tensor(queries, dtype=torch.int64), torch.as_tensor(objects, dtype=torch.int64)))
        return indices
