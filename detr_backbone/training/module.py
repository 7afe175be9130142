"""The LightningModule that trains a DETR detector around the Joiner.

It owns what DETR's training script spread around: optimizer parameter groups chosen by module
(head at ``lr``, trainable backbone at ``lr_backbone``, learned positional table at
``position.lr``; frozen parameters in none), the step schedule, loss logging, and COCO-style
mAP on validation and test. Hyperparameters are saved as plain dicts, so checkpoints load with
``weights_only=True``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_convert

from ..compilation import compile_in_place
from ..config import JoinerConfig, structured
from ..detection.criterion import SetCriterion
from ..detection.detr import DETR
from ..detection.matcher import HungarianMatcher
from ..detection.postprocess import PostProcess
from ..detection.transformer import build_transformer
from ..joiner import build_backbone
from ..nested_tensor import NestedTensor
from ..param_groups import joiner_parameter_groups, make_group
from .config import HeadConfig, OptimConfig

Batch = tuple[NestedTensor, Sequence[Mapping[str, Tensor]]]
MAP_KEYS = ("map", "map_50", "map_75")


def build_detector(joiner_cfg: JoinerConfig, head: HeadConfig, num_classes: int) -> DETR:
    transformer = build_transformer(
        d_model=joiner_cfg.hidden_dim,
        nhead=head.nheads,
        num_encoder_layers=head.enc_layers,
        num_decoder_layers=head.dec_layers,
        dim_feedforward=head.dim_feedforward,
        dropout=head.dropout,
        normalize_before=head.pre_norm,
        return_intermediate_dec=True,
    )
    detector = DETR(build_backbone(joiner_cfg), transformer, num_classes, head.num_queries, aux_loss=head.aux_loss)
    if head.compile:
        compile_in_place(detector)  # state dict keys unchanged
    return detector


def build_criterion(head: HeadConfig, num_classes: int, num_boxes_reduce) -> SetCriterion:
    matcher = HungarianMatcher(head.cost_class, head.cost_bbox, head.cost_giou)
    weights = {"loss_ce": head.loss_ce, "loss_bbox": head.loss_bbox, "loss_giou": head.loss_giou}
    return SetCriterion(num_classes, matcher, head.eos_coef, weights, num_boxes_reduce=num_boxes_reduce)


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
    ):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes: {list(class_names)}")
        self.joiner_cfg = JoinerConfig.from_args(joiner)
        self.head_cfg = structured(HeadConfig, head, "model")
        self.optim_cfg = structured(OptimConfig, optim, "optim")
        self.detector = build_detector(self.joiner_cfg, self.head_cfg, num_classes)
        self.criterion = build_criterion(self.head_cfg, num_classes, self.mean_over_processes)
        self.postprocess = PostProcess()
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        self.test_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        # The initial weights (pretrained, checkpoint file) live in the state dict from now on:
        # rebuilding from a Lightning checkpoint must not reach for those sources again.
        saved_joiner = asdict(self.joiner_cfg)
        saved_joiner["backbone"].update(pretrained=False, checkpoint=None)
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
        predictions = self.postprocess(outputs, torch.stack([target["orig_size"] for target in targets]))
        # the metric accumulates in float32 whatever the precision the model ran at
        predictions = [{"scores": p["scores"].float(), "labels": p["labels"], "boxes": p["boxes"].float()} for p in predictions]
        metric.update(predictions, [{"boxes": absolute_xyxy(target), "labels": target["labels"]} for target in targets])

    def loss(self, stage: str, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> Tensor:
        """The weighted training loss, logged with its parts (auxiliary-layer losses are not logged)."""
        losses = self.criterion(outputs, targets)
        total = self.criterion.weighted_total(losses)
        shown = {f"{stage}/{name}": value for name, value in losses.items() if name[-1].isalpha()}
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

    def configure_optimizers(self):
        backbone_ids = {id(p) for p in self.detector.backbone.parameters()}
        head = [p for p in self.detector.parameters() if id(p) not in backbone_ids]
        groups = make_group("head", head, self.optim_cfg.lr) + joiner_parameter_groups(self.detector.backbone, self.joiner_cfg)
        optimizer = torch.optim.AdamW(
            groups, lr=self.optim_cfg.lr, weight_decay=self.optim_cfg.weight_decay, fused=self.fused_optimizer_allowed()
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.optim_cfg.lr_drop)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
