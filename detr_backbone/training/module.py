"""The LightningModule that trains a detector of any head around the Joiner.

It owns what DETR's training script spread around: optimizer parameter groups chosen by module
(head at ``lr``, trainable backbone at ``lr_backbone``, learned positional table at
``position.lr``; frozen parameters in none), the lr schedule (training/schedule.py), loss logging, and COCO-style
mAP on validation and test. Hyperparameters are saved as plain dicts, so checkpoints load with
``weights_only=True``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from ..detection import build_criterion, detector_config
from ..detection.boxes import per_image, target_boxes_in_pixels
from ..detection.criterion import AUX_SUFFIX
from ..inference.checkpoint import TRAINING_CHECKPOINT, buildable_config, key_mismatch, read_checkpoint
from ..nested_tensor import NestedTensor
from ..param_groups import joiner_parameter_groups, make_group
from ..validation import structured
from .config import EvaluationConfig, OptimConfig
from .schedule import RunSchedule

Batch = tuple[NestedTensor, Sequence[Mapping[str, Tensor]]]
MAP_KEYS = ("map", "map_50", "map_75")


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
        evaluation: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        # typed once; hyperparameters may come from a checkpoint (load_from_checkpoint): build only what is ours or allowed
        self.config = detector_config(joiner, head, num_classes, class_names)
        self.config.check_targets(allowed_targets, "the config of this DetrModule")
        self.optim_cfg = structured(OptimConfig, optim, "optim")
        self.detector = self.config.build()
        self.criterion = build_criterion(self.config, self.mean_over_processes)
        self.evaluation = structured(EvaluationConfig, evaluation or {}, "evaluation")
        self.val_map, self.test_map = self.mean_average_precision(), self.mean_average_precision()
        self.save_hyperparameters(
            {
                **self.config.hyperparameters(),
                "optim": asdict(self.optim_cfg),
                "evaluation": asdict(self.evaluation),
            }
        )

    def mean_average_precision(self) -> MeanAveragePrecision:
        return MeanAveragePrecision(
            box_format="xyxy",
            iou_type="bbox",
            backend=self.evaluation.backend,
            class_metrics=self.evaluation.class_metrics,
        )

    def mean_over_processes(self, num_boxes: Tensor) -> Tensor:
        """DETR normalises the box losses by the box count averaged over all processes."""
        trainer = self._trainer  # the public property raises when no Trainer runs the module (a plain loop)
        if trainer is None or trainer.world_size == 1:
            return num_boxes
        return trainer.strategy.reduce(num_boxes, reduce_op="mean")

    def forward(self, images: NestedTensor, targets: Sequence[Mapping[str, Tensor]] | None = None) -> dict[str, Any]:
        """The detector's outputs; ``targets`` reach a head that trains on them (DINO's denoising queries)."""
        # NestedTensor is not a Tensor, so "-true" precisions do not cast it; follow the weights.
        images = images.to(self.dtype)
        if targets is not None and self.detector.TRAINS_ON_TARGETS:
            return self.detector(images, targets)
        return self.detector(images)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        return self.loss("train", self(images, targets), targets)

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
        metric.update(
            predictions, [{"boxes": target_boxes_in_pixels(target), "labels": target["labels"]} for target in targets]
        )

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
        if metric.class_metrics:
            self.log_dict(self.per_class_map(stage, results), sync_dist=False)
        metric.reset()

    def per_class_map(self, stage: str, results: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``<stage>/map_per_class/<class name>`` of every class with ground truth (COCOeval's -1 marks one without)."""
        names = self.config.class_names or [f"class {label}" for label in range(self.config.num_classes)]
        classes, values = results["classes"].reshape(-1).tolist(), results["map_per_class"].reshape(-1)
        return {f"{stage}/map_per_class/{names[label]}": value for label, value in zip(classes, values) if value > -1}

    def fused_optimizer_allowed(self) -> bool:
        """The fused AdamW kernel (several times faster on a CPU) wherever Lightning can clip its gradients.

        Lightning's mixed-precision plugin refuses to clip for any optimizer able to unscale fp16
        gradients itself, which fused AdamW is.
        """
        trainer = self._trainer
        return trainer is None or not isinstance(trainer.precision_plugin, MixedPrecision)

    def build_optimizer(self) -> torch.optim.AdamW:
        """The head at ``lr``, the Joiner's groups (``lr_backbone``, the positional table's lr) and the head's own
        groups (Deformable DETR: its sampling offsets at ``lr * lr_linear_proj_mult``); frozen tensors in none."""
        lr, joiner = self.optim_cfg.lr, self.detector.backbone
        own = self.config.head.parameter_groups(self.detector, lr)
        apart = {id(p) for p in joiner.parameters()} | {id(p) for group in own for p in group["params"]}
        head = [p for p in self.detector.parameters() if id(p) not in apart]
        groups = make_group("head", head, lr) + joiner_parameter_groups(joiner, self.config.joiner, lr) + own
        return torch.optim.AdamW(
            groups, lr=lr, weight_decay=self.optim_cfg.weight_decay, fused=self.fused_optimizer_allowed()
        )

    def configure_optimizers(self):
        """The optimizer and its lr schedule (``optimizer.schedule``), stepped after every optimizer step."""
        optimizer = self.build_optimizer()
        scheduler = RunSchedule(optimizer, self.optim_cfg, self.optim_cfg.lr_drop)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """The schedule learns the run's length: the train loader is built (and a resumed one repositioned) by now."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 1
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, RunSchedule):
                config.scheduler.fit_to_run(trainer.estimated_stepping_batches, per_epoch)


def load_training_module(path: str | os.PathLike, allowed_targets: Sequence[str] = ()) -> DetrModule:
    """The DetrModule of a train.py checkpoint, in eval mode, its config typed once; every ``_target_`` of
    the saved config must be ours or in ``allowed_targets``, and compilation saved with the run is left off."""
    content = read_checkpoint(path, TRAINING_CHECKPOINT)
    config = buildable_config(content, path, allowed_targets)
    if config is None:
        raise ValueError(
            f"{os.fspath(path)} is not {TRAINING_CHECKPOINT} (no DetrModule hyperparameters and state_dict in it)"
        )
    hparams = content["hyper_parameters"]
    module = DetrModule(
        config.joiner,
        config.head,
        hparams["optim"],
        config.num_classes,
        config.class_names,
        allowed_targets,
        hparams.get("evaluation"),  # written before it was saved: the defaults
    )
    mismatch = key_mismatch(*module.load_state_dict(content["state_dict"], strict=False))
    if mismatch:
        raise ValueError(f"{os.fspath(path)} does not fit the DetrModule its hyperparameters describe: {mismatch}")
    return module.eval()
