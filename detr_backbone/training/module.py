"""The LightningModule that trains a DETR detector around the Joiner.

It owns what DETR's training script spread around: optimizer parameter groups chosen by module
(head at ``lr``, trainable backbone at ``lr_backbone``, learned positional table at
``position.lr``; frozen parameters in none), the step schedule, loss logging, and COCO-style
mAP on validation and test. Hyperparameters are saved as plain dicts, so checkpoints load with
``weights_only=True``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_convert

from ..compilation import compile_in_place
from ..config import BackboneConfig, JoinerConfig, structured
from ..detection.criterion import AUX_SUFFIX, SetCriterion
from ..detection.deformable import build_deformable_criterion
from ..detection.matcher import HungarianMatcher
from ..detection.postprocess import per_image
from ..joiner import build_backbone
from ..nested_tensor import NestedTensor
from ..param_groups import joiner_parameter_groups, make_group
from ..targets import check_allowed, instantiate_target, resolve
from .config import DeformableHeadConfig, HeadConfig, OptimConfig, head_config

Batch = tuple[NestedTensor, Sequence[Mapping[str, Tensor]]]
MAP_KEYS = ("map", "map_50", "map_75")


def build_detector(joiner_cfg: JoinerConfig, head: HeadConfig | DeformableHeadConfig, num_classes: int) -> nn.Module:
    """The detector ``head._target_`` builds around the Joiner, from the head fields its signature names."""
    accepted = inspect.signature(resolve(head._target_, "model._target_")).parameters
    arguments = {name: value for name, value in asdict(head).items() if name in accepted and name != "_target_"}
    backbone = build_backbone(joiner_cfg)
    detector = instantiate_target(
        head._target_, arguments, "model", backbone=backbone, num_classes=num_classes, hidden_dim=joiner_cfg.hidden_dim
    )
    if head.compile:
        compile_in_place(detector)  # state dict keys unchanged
    return detector


def check_targets(joiner_cfg: JoinerConfig, head: HeadConfig, allowed: Sequence[str], source: str) -> None:
    """Refuse to build what a config from ``source`` names unless it is ours or in ``allowed``."""
    for where, target in (
        ("backbone._target_", joiner_cfg.backbone._target_),
        ("position._target_", joiner_cfg.position._target_),
        ("model._target_", head._target_),
    ):
        check_allowed(target, allowed, where, source)


def saved_config(config: Any) -> dict[str, Any]:
    """A backbone or position config as the plain dict a checkpoint keeps (the user's own: its flat node)."""
    return config.as_node() if hasattr(config, "as_node") else asdict(config)


def build_criterion(head: HeadConfig | DeformableHeadConfig, num_classes: int, num_boxes_reduce) -> SetCriterion:
    """The head's set loss: DETR's cross-entropy with a down-weighted "no object", or Deformable-DETR's focal loss."""
    weights = {"loss_ce": head.loss_ce, "loss_bbox": head.loss_bbox, "loss_giou": head.loss_giou}
    costs = {"cost_class": head.cost_class, "cost_bbox": head.cost_bbox, "cost_giou": head.cost_giou}
    if isinstance(head, DeformableHeadConfig):
        return build_deformable_criterion(
            num_classes, **costs, **weights, focal_alpha=head.focal_alpha, num_boxes_reduce=num_boxes_reduce
        )
    matcher = HungarianMatcher(**costs)
    return SetCriterion(num_classes, matcher, head.eos_coef, weights, num_boxes_reduce=num_boxes_reduce)


def with_head_levels(joiner_cfg: JoinerConfig, head: HeadConfig | DeformableHeadConfig) -> JoinerConfig:
    """The Joiner config a head reads: a multi-scale head given one of our backbones without ``levels``
    takes the levels Deformable-DETR's build_backbone takes (DETR's spellings choose DETR's levels)."""
    backbone = joiner_cfg.backbone
    if (
        not isinstance(head, DeformableHeadConfig)
        or not isinstance(backbone, BackboneConfig)
        or backbone.levels is not None
    ):
        return joiner_cfg
    levels = replace(backbone, levels=head.backbone_levels(), return_interm_layers=False, main_layer=-1)
    return replace(joiner_cfg, backbone=levels)


def absolute_xyxy(target: Mapping[str, Tensor]) -> Tensor:
    """A target's normalized cxcywh boxes in pixels of the original image."""
    height, width = target["orig_size"].tolist()
    scale = target["boxes"].new_tensor([width, height, width, height])
    return box_convert(target["boxes"], "cxcywh", "xyxy") * scale


class DetrModule(pl.LightningModule):
    """``class_names`` (label order) are saved with the hyperparameters, so a checkpoint says what it detects;
    checkpoints written before they were saved load with ``class_names`` None."""

    def __init__(
        self,
        joiner: Mapping[str, Any],
        head: Mapping[str, Any],
        optim: Mapping[str, Any],
        num_classes: int,
        class_names: Sequence[str] | None = None,
        allowed_targets: Sequence[str] = (),
    ):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes: {list(class_names)}")
        self.head_cfg = head_config(head)
        self.joiner_cfg = with_head_levels(JoinerConfig.from_args(joiner), self.head_cfg)
        self.optim_cfg = structured(OptimConfig, optim, "optim")
        # hyperparameters may come from a checkpoint (load_from_checkpoint): build only what is ours or allowed
        check_targets(self.joiner_cfg, self.head_cfg, allowed_targets, "the config of this DetrModule")
        self.detector = build_detector(self.joiner_cfg, self.head_cfg, num_classes)
        self.criterion = build_criterion(self.head_cfg, num_classes, self.mean_over_processes)
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        self.test_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        # The initial weights (pretrained, checkpoint file) live in the state dict from now on:
        # rebuilding from a Lightning checkpoint must not reach for those sources again.
        saved_backbone = {**saved_config(self.joiner_cfg.backbone), "checkpoint": None}
        if isinstance(self.joiner_cfg.backbone, BackboneConfig):
            saved_backbone["pretrained"] = False
        saved_joiner = {
            **asdict(self.joiner_cfg),
            "backbone": saved_backbone,
            "position": saved_config(self.joiner_cfg.position),
        }
        self.save_hyperparameters(
            {
                "joiner": saved_joiner,
                "head": asdict(self.head_cfg),
                "optim": asdict(self.optim_cfg),
                "num_classes": num_classes,
                "class_names": None if class_names is None else [str(name) for name in class_names],
            }
        )

    def mean_over_processes(self, num_boxes: Tensor) -> Tensor:
        """DETR normalises the box losses by the box count averaged over all processes."""
        trainer = self._trainer  # the public property raises when no Trainer runs the module (a plain loop)
        if trainer is None or trainer.world_size == 1:
            return num_boxes
        return trainer.strategy.reduce(num_boxes, reduce_op="mean")

    def forward(self, images: NestedTensor) -> dict[str, Any]:
        # NestedTensor is not a Tensor, so "-true" precisions do not cast it; follow the weights.
        return self.detector(images.to(self.dtype))

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        return self.loss("train", self(images), targets)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluate("val", batch, self.val_map)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluate("test", batch, self.test_map)

    def evaluate(self, stage: str, batch: Batch, metric: MeanAveragePrecision) -> None:
        images, targets = batch
        outputs = self(images)
        self.loss(stage, outputs, targets)
        predictions = per_image(
            *self.detector.detections(outputs, torch.stack([target["orig_size"] for target in targets]))
        )
        # the metric accumulates in float32 whatever the precision the model ran at
        predictions = [
            {"scores": p["scores"].float(), "labels": p["labels"], "boxes": p["boxes"].float()} for p in predictions
        ]
        metric.update(predictions, [{"boxes": absolute_xyxy(target), "labels": target["labels"]} for target in targets])

    def loss(self, stage: str, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> Tensor:
        """The weighted training loss, logged with its parts (auxiliary-layer and proposal losses are not logged)."""
        losses = self.criterion(outputs, targets)
        total = self.criterion.weighted_total(losses)
        shown = {
            f"{stage}/{name}": value for name, value in losses.items() if AUX_SUFFIX.fullmatch(name)["name"] == name
        }
        sync = stage != "train"
        self.log(f"{stage}/loss", total, prog_bar=True, batch_size=len(targets), sync_dist=sync)
        self.log_dict(shown, batch_size=len(targets), sync_dist=sync)
        return total

    def on_validation_epoch_end(self) -> None:
        self.log_map("val", self.val_map)

    def on_test_epoch_end(self) -> None:
        self.log_map("test", self.test_map)

    def log_map(self, stage: str, metric: MeanAveragePrecision) -> None:
        results = metric.compute()
        self.log_dict({f"{stage}/{key}": results[key] for key in MAP_KEYS}, prog_bar=True, sync_dist=False)
        metric.reset()

    def fused_optimizer_allowed(self) -> bool:
        """The fused AdamW kernel (several times faster on a CPU) wherever Lightning can clip its gradients.

        Lightning's mixed-precision plugin refuses to clip for any optimizer able to unscale fp16
        gradients itself, which fused AdamW is.
        """
        trainer = self._trainer
        return trainer is None or not isinstance(trainer.precision_plugin, MixedPrecision)

    def linear_projections(self) -> list[torch.nn.Parameter]:
        """Deformable-DETR's sampling offsets and reference points, trained at ``lr * lr_linear_proj_mult``."""
        if not isinstance(self.head_cfg, DeformableHeadConfig):
            return []
        return [parameter for _, parameter in self.detector.linear_projection_parameters()]

    def configure_optimizers(self):
        projections = self.linear_projections()
        apart = {id(p) for p in self.detector.backbone.parameters()} | {id(p) for p in projections}
        head = [p for p in self.detector.parameters() if id(p) not in apart]
        lr = self.optim_cfg.lr
        groups = make_group("head", head, lr) + joiner_parameter_groups(self.detector.backbone, self.joiner_cfg)
        if projections:
            groups += make_group("linear_projection", projections, lr * self.head_cfg.lr_linear_proj_mult)
        optimizer = torch.optim.AdamW(
            groups, lr=self.optim_cfg.lr, weight_decay=self.optim_cfg.weight_decay, fused=self.fused_optimizer_allowed()
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.optim_cfg.lr_drop)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
