"""Schemas of the training job's config groups (data, trainer, callbacks, logger; each head owns its model schema).

Registered in Hydra's ConfigStore with the Joiner's schemas as ``config_schema``, the first
entry of conf/config.yaml: every composed config is checked against them, so a misspelled key
or a value of the wrong type fails at composition with the key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import BackboneConfig, PositionConfig, backbone_config, position_config
from ..data.augment import FILES_SIZE, check_augment
from ..detection import HEADS, head_config
from ..inference.coco_metrics import check_coco_backend
from ..validation import require
from .schedule import ScheduleConfig

MONITOR_MODES = ("max", "min")


@dataclass
class OptimConfig(ScheduleConfig):
    """What the module's optimizer and schedule read: the top-level knobs and the ``optimizer`` node."""

    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_drop: int = 200  # epochs before the lr drops tenfold

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lr > 0, f"lr={self.lr} must be > 0")
        require(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        require(self.lr_drop > 0, f"lr_drop={self.lr_drop} must be > 0 epochs")


@dataclass
class DataConfig:
    """conf/data/: ``shapes`` (embedded synthetic default), or a folder of your own: ``coco`` (COCO JSON),
    ``yolo`` (a data.yaml with its images and labels) or ``voc`` (Pascal VOC)."""

    kind: str = "shapes"
    batch_size: int = 8
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    size_divisibility: int = 0  # pad batches to a multiple of it; 0: none, or 32 when compiling (one graph per shape)
    seed: int = 0
    train_size: int = 2000  # shapes
    val_size: int = 200
    min_size: int = 96
    max_size: int = 128
    max_objects: int = 3
    cache: bool = False  # shapes: keep each rendered image in memory, so it is drawn once per process
    # shapes: the kinds drawn, in label order; null: rectangle, ellipse, triangle. voc: the class names, in label
    # order (objects of other classes are dropped); null: every name in its XMLs, sorted
    classes: Optional[list[str]] = None
    train_images: Optional[str] = None  # coco
    train_annotations: Optional[str] = None
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None
    root: Optional[str] = None  # yolo: the folder of data.yaml (or the file); voc: the folder of Annotations/
    train_split: str = "train"  # yolo: data.yaml's key of the split; voc: ImageSets/Main/<name>.txt
    val_split: str = "val"
    difficult: str = "drop"  # voc: objects marked difficult are left out of training and evaluation (VOC's rule) | keep
    scales: list[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    max_resize: int = 1333
    val_resize: int = 800
    bad_samples: str = "skip"  # an image that cannot be read: error (stop, naming it) | skip (a stand-in, warned once)
    max_bad_fraction: float = 0.01  # skip: stop once more than this fraction of a split's images could not be read
    # training augmentation, data/augment.py and docs/training.md#augmentation-policies
    augment: Optional[str] = None  # detr | rtdetr | deim | none; null: detr for image folders, none for shapes
    size: int = FILES_SIZE  # image folders: the square side of rtdetr and deim (shapes: max_size)
    multi_scale: list[int] = field(default_factory=list)  # one side per batch drawn from these (RT-DETR); []: off
    # the policies' probabilities; null: the reference's (flip 0.5, photometric 0.5, zoom-out 0.5, IoU crop 0.8,
    # Mosaic 0.5, MixUp 0.5)
    flip_prob: Optional[float] = None
    photometric_prob: Optional[float] = None
    zoom_out_prob: Optional[float] = None
    iou_crop_prob: Optional[float] = None
    mosaic_prob: Optional[float] = None
    mixup_prob: Optional[float] = None
    # rtdetr, deim: the fraction of the run after which only flips remain; null: the policy's (rtdetr 71/72,
    # RT-DETR's 6x schedule's; deim 50/58, DEIM-D-FINE-L's)
    augment_stop: Optional[float] = None
    # deim: [start, end] fractions of the run with Mosaic and MixUp; null: 4/58, 29/58 (DEIM-D-FINE-L's)
    mosaic_phase: Optional[list[float]] = None

    def __post_init__(self) -> None:
        check_augment(vars(self))


@dataclass
class TrainerConfig:
    """Arguments of ``pytorch_lightning.Trainer`` (conf/trainer/)."""

    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: str = "32-true"
    max_epochs: int = 50
    max_steps: int = -1
    max_time: Optional[str] = None
    gradient_clip_val: Optional[float] = 0.1
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int = 1
    check_val_every_n_epoch: Optional[int] = 1
    val_check_interval: Any = None
    log_every_n_steps: int = 10
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    num_sanity_val_steps: int = 2
    fast_dev_run: Any = False  # n (or true: 1) batches of train, val and test; no checkpoints, no logging
    overfit_batches: Any = 0.0  # only the first n batches (or fraction) of train and val, unshuffled, every epoch
    profiler: Optional[str] = None  # simple | advanced: the report goes to <run>/<stage>-profiler.txt
    detect_anomaly: bool = False  # autograd names the operation that produced a NaN or infinite gradient
    deterministic: Any = False
    benchmark: Optional[bool] = None
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    sync_batchnorm: bool = False
    use_distributed_sampler: bool = True

    def __post_init__(self) -> None:
        require(
            self.accumulate_grad_batches >= 1,
            f"trainer.accumulate_grad_batches={self.accumulate_grad_batches} must be >= 1 batches per optimizer step",
        )


@dataclass
class CheckpointConfig:
    monitor: str = "val/map_50"
    mode: str = "max"
    save_top_k: int = 1
    save_last: bool = True
    every_n_epochs: int = 1
    every_n_train_steps: Optional[int] = None  # also write last.ckpt every n steps, so a killed run resumes mid-epoch

    def __post_init__(self) -> None:
        require(
            self.every_n_train_steps is None or self.every_n_train_steps > 0,
            f"callbacks.checkpoint.every_n_train_steps={self.every_n_train_steps} must be null (off) or > 0",
        )


@dataclass
class PredictionsConfig:
    """The PNG grid of validation images with predicted and ground-truth boxes, <run>/predictions/."""

    enabled: bool = True
    num_images: int = 4  # the first images of the validation set, the same every epoch
    score_threshold: float = 0.5  # detections scoring below are not drawn
    image_side: int = 256  # each image is scaled to this longer side

    def __post_init__(self) -> None:
        require(self.num_images >= 1, f"callbacks.predictions.num_images={self.num_images} must be >= 1")
        require(
            0 <= self.score_threshold <= 1,
            f"callbacks.predictions.score_threshold={self.score_threshold} must be in [0, 1]",
        )
        require(self.image_side >= 16, f"callbacks.predictions.image_side={self.image_side} must be >= 16")


@dataclass
class EmaConfig:
    """An exponential moving average of the detector's weights, validated, checkpointed and exported instead of them.

    The decay warms up as RT-DETR's and D-FINE's ModelEMA (taken from YOLOv5) does it:
    ``decay * (1 - exp(-updates / warmup_steps))``, so the average follows the weights closely while they move
    fast at the start. timm's own warm-up (``1 - (1 + updates) ** -power``) is not the DETR family's.
    """

    enabled: bool = False
    decay: float = 0.9999  # RT-DETR's and D-FINE's
    warmup_steps: int = 2000  # optimizer steps of the warm-up's time constant (RT-DETR 2000, D-FINE 1000); 0: none

    def __post_init__(self) -> None:
        require(0 < self.decay < 1, f"callbacks.ema.decay={self.decay} must be in (0, 1), e.g. 0.9999")
        require(
            self.warmup_steps >= 0,
            f"callbacks.ema.warmup_steps={self.warmup_steps} must be >= 0 optimizer steps (0: no warm-up)",
        )


@dataclass
class EarlyStoppingConfig:
    """Lightning's EarlyStopping: stop once ``monitor`` has not improved by ``min_delta`` for ``patience`` validations."""

    enabled: bool = False
    monitor: str = "val/map_50"
    mode: str = "max"
    patience: int = 5  # validations without improvement before the run stops
    min_delta: float = 0.0  # a smaller change is no improvement

    def __post_init__(self) -> None:
        require(
            self.mode in MONITOR_MODES,
            f"callbacks.early_stopping.mode={self.mode!r} is not one of {', '.join(MONITOR_MODES)}",
        )
        require(self.patience >= 1, f"callbacks.early_stopping.patience={self.patience} must be >= 1 validation")
        require(self.min_delta >= 0, f"callbacks.early_stopping.min_delta={self.min_delta} must be >= 0")


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    lr_monitor: bool = True
    progress_bar: str = "tqdm"  # tqdm | rich | none
    non_finite_loss: str = "stop"  # a NaN / infinite training loss: stop (error naming the step) | skip (the step)
    slurm_requeue: bool = True  # under SLURM, the warning signal (sbatch --signal=USR1@120) also requeues the job
    parameter_summary: bool = True  # trainable / frozen counts per part at fit start
    predictions: PredictionsConfig = field(default_factory=PredictionsConfig)


@dataclass
class EvaluationConfig:
    """COCO mAP of validation and test (torchmetrics' MeanAveragePrecision)."""

    backend: str = "pycocotools"  # pycocotools | faster_coco_eval: the COCOeval implementation, same numbers
    class_metrics: bool = (
        True  # <stage>/map_per_class/<class name> per class: the metric's compute costs 2.5-3x as much
    )

    def __post_init__(self) -> None:
        check_coco_backend(self.backend, "evaluation.backend")


WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    """Weights & Biases (conf/logger/wandb.yaml); its files go to <run>/wandb/."""

    project: str = "detr-backbone"
    entity: Optional[str] = None  # team or user; null: the account's default
    name: Optional[str] = None  # run name; null: W&B picks one
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = None  # null: offline unless W&B is set up here (WANDB_MODE, WANDB_API_KEY, wandb login)

    def __post_init__(self) -> None:
        require(
            self.mode is None or self.mode in WANDB_MODES,
            f"logger.wandb.mode={self.mode!r} is not one of {', '.join(WANDB_MODES)} (or null: W&B's own setup, else offline)",
        )


@dataclass
class MLflowConfig:
    """MLflow (conf/logger/mlflow.yaml)."""

    experiment_name: str = "detr-backbone"
    run_name: Optional[str] = None  # null: MLflow picks one
    tracking_uri: Optional[str] = None  # null: MLFLOW_TRACKING_URI, else a file store in <run>/mlruns
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    csv: bool = True
    tensorboard: bool = False
    wandb: Optional[WandbConfig] = None  # experiment trackers, each an optional extra: pip install -e ".[wandb]"
    mlflow: Optional[MLflowConfig] = None


@dataclass
class Config:
    """The primary config: the groups, plus the knobs typed on the command line."""

    # untyped for Hydra: a group's schema follows its _target_ (ours, or a backbone of the user's own),
    # so __post_init__ checks each node against the schema its target selects
    backbone: Any = field(default_factory=dict)
    position: Any = field(default_factory=dict)
    model: Any = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    optimizer: ScheduleConfig = field(default_factory=ScheduleConfig)  # the lr's course: training/schedule.py
    hidden_dim: int = 256
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop: int = 200
    clip_max_norm: float = 0.1
    precision: str = "32-true"
    dilation: bool = False
    return_interm_layers: bool = False
    freeze_backbone: bool = False
    seed: int = 42
    ckpt_path: Optional[str] = None  # resume from this Lightning checkpoint
    # start a new run from a detector's weights: DETR .pth, Hugging Face folder, our .ckpt
    init_from: Optional[str] = None
    test_after_fit: bool = True  # test the best checkpoint once fitting ends
    # a small dataset trains more epochs than trainer.max_epochs, until this many optimizer steps; null: off
    min_train_steps: Optional[int] = None
    optimized_metric: str = "val/map_50"  # the value train.py returns to a sweeper (conf/hparams_search/)

    def __post_init__(self) -> None:
        require(
            self.min_train_steps is None or self.min_train_steps > 0,
            f"min_train_steps={self.min_train_steps} must be > 0 optimizer steps (or null: trainer.max_epochs alone)",
        )
        self.backbone, self.position = backbone_config(self.backbone), position_config(self.position)
        self.model = head_config(self.model)
        require(
            not self.dilation or isinstance(self.backbone, BackboneConfig),
            f"dilation=true applies to our backbones; backbone._target_={self.backbone._target_!r} is your own, "
            "so pass dilation through its own arguments",
        )


GROUP_SCHEMAS = {
    "backbone": BackboneConfig,
    "position": PositionConfig,
    **{name: head.schema for name, head in HEADS.items()},
}


def register_configs() -> None:
    """Make the schemas available to Hydra: ``config_schema`` for the primary config, and ``schema/<name>``
    for our group options to extend (``defaults: [/schema/backbone@_here_]``), so that every key of ours
    can be overridden and is checked at composition, while a backbone of the user's own stays free-form."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for name, schema in GROUP_SCHEMAS.items():
        store.store(group="schema", name=name, node=schema)
