"""The Lightning DataModule that feeds (NestedTensor, targets) batches, and its builder from config."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from functools import partial
from typing import Any, Literal

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from ..image_input import InputConfig
from .augment import MultiScale, PolicyTransforms, files_policy_transforms, shapes_policy_transforms
from .bad_samples import check_bad_samples
from .coco import CocoDetection
from .collate import DetectionCollate
from .resumable import ResumableDataLoader
from .sampler import EpochShuffleSampler
from .shapes import ShapesDataset
from .transforms import SampleTransform, detr_train_transforms, detr_val_transforms
from .voc import VocDetection
from .yolo import YoloDetection

Split = Literal["train", "val", "test"]
DatasetSource = Dataset | Callable[[], Dataset]  # a dataset, or a factory called once when first needed


class DetectionDataModule(pl.LightningDataModule):
    """Train / val / test loaders over detection datasets (a test set defaults to the val set)."""

    def __init__(
        self,
        train_dataset: DatasetSource,
        val_dataset: DatasetSource,
        test_dataset: DatasetSource | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        size_divisibility: int = 0,
        seed: int = 0,
        multi_scale: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        # Only plain numbers go into checkpoints; datasets and factories are rebuilt from config.
        self.save_hyperparameters(ignore=["train_dataset", "val_dataset", "test_dataset"])
        self._sources: dict[Split, DatasetSource | None] = {
            "train": train_dataset,
            "val": val_dataset,
            "test": test_dataset,
        }
        self._datasets: dict[Split, Dataset] = {}

    def dataset(self, split: Split) -> Dataset:
        """The dataset of ``split``, built from its factory on first use."""
        if split == "test" and self._sources["test"] is None:
            return self.dataset("val")
        if split not in self._datasets:
            source = self._sources[split]
            dataset = source if isinstance(source, Dataset) else source()
            if isinstance(getattr(dataset, "transforms", None), PolicyTransforms):
                dataset.transforms.bind(dataset)  # Mosaic and MixUp draw their partners from it
            self._datasets[split] = dataset
        return self._datasets[split]

    @property
    def augment_schedule(self) -> PolicyTransforms | None:
        """The train set's augmentation policy, whose phase the AugmentPhase callback sets; None without one."""
        schedule = getattr(self.dataset("train"), "transforms", None)
        return schedule if isinstance(schedule, PolicyTransforms) else None

    def _multi_scale(self) -> MultiScale | None:
        schedule = self.augment_schedule
        if not self.hparams.multi_scale or schedule is None:
            return None
        return MultiScale(tuple(self.hparams.multi_scale), schedule.policy, schedule.state, self.hparams.seed)

    def setup(self, stage: str | None = None) -> None:
        splits: dict[str | None, tuple[Split, ...]] = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
        }
        for split in splits.get(stage, ("train", "val", "test")):
            self.dataset(split)

    @property
    def num_classes(self) -> int:
        return self.dataset("train").num_classes

    @property
    def class_names(self) -> Sequence[str]:
        return self.dataset("train").class_names

    def _loader(self, split: Split, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        dataset = self.dataset(split)
        # the train loader resumes mid-epoch where a checkpoint left it (data/resumable.py)
        loader = ResumableDataLoader if shuffle else DataLoader
        return loader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=EpochShuffleSampler(dataset, self.hparams.seed) if shuffle else None,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.persistent_workers and workers > 0,
            collate_fn=DetectionCollate(self.hparams.size_divisibility, self._multi_scale() if shuffle else None),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


DATA_KINDS = ("shapes", "coco", "yolo", "voc")
FOLDER_KINDS = ("coco", "yolo", "voc")  # the user's own data, read from files
LOADER_FIELDS = (
    "batch_size",
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "size_divisibility",
    "seed",
    "multi_scale",
)


def _plain(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"data config must be a mapping or a dataclass, got {type(cfg).__name__}")


def _present(values: Mapping[str, Any], renames: Mapping[str, str]) -> dict[str, Any]:
    """``{argument: values[field]}`` for the fields that are set, so unset ones keep the callee's default."""
    return {argument: values[field] for field, argument in renames.items() if values.get(field) is not None}


def _require(values: Mapping[str, Any], fields: Sequence[str], kind: str) -> None:
    missing = [field for field in fields if values.get(field) is None]
    if missing:
        raise ValueError(f"data config of kind {kind!r} is missing {', '.join(missing)}")


def _shapes_sources(values: Mapping[str, Any], input: InputConfig) -> tuple[DatasetSource, DatasetSource]:
    _require(values, ("train_size", "val_size"), "shapes")
    options = _present(
        values, {name: name for name in ("seed", "min_size", "max_size", "max_objects", "cache", "classes")}
    )
    train, val = shapes_policy_transforms(values, input)
    # without augmentation a sample is the same every epoch: the cache keeps it transformed
    fixed = train.policy.name == "none"
    return (
        partial(ShapesDataset, values["train_size"], split="train", transforms=train, cache_samples=fixed, **options),
        partial(ShapesDataset, values["val_size"], split="val", transforms=val, cache_samples=True, **options),
    )


def folder_transforms(values: Mapping[str, Any], input: InputConfig) -> tuple[SampleTransform, SampleTransform]:
    """The train and val transforms of a dataset read from files (coco, yolo, voc): the policy of ``augment``
    (DETR's by default, data/augment.py), and its evaluation transform, both as the detector's ``input`` says."""
    resize = _present(values, {"val_resize": "size", "max_resize": "max_size"})
    val = detr_val_transforms(**resize, normalize=input.normalize)
    train_sizes = _present(values, {"scales": "scales", "max_resize": "max_size"})
    return files_policy_transforms(
        values, partial(detr_train_transforms, **train_sizes, normalize=input.normalize), val, input
    )


def _refuse_shapes_keys(values: Mapping[str, Any], kind: str, classes_are: str | None) -> None:
    if values.get("cache"):
        raise ValueError(
            f"data.cache=true applies to data=shapes only: {kind} images are read and augmented afresh each time"
        )
    if classes_are is not None and values.get("classes") is not None:
        raise ValueError(f"data.classes applies to data=shapes and data=voc only: {classes_are}")


def _folder_sources(
    values: Mapping[str, Any], input: InputConfig, dataset: Callable[..., Dataset], **splits: Any
) -> tuple[partial, partial]:
    """The train and val factories of a file-backed ``dataset``, ``splits``' values its per-split arguments."""
    train_transforms, val_transforms = folder_transforms(values, input)
    bad_samples = _present(values, {"bad_samples": "bad_samples"})
    train, val = ({key: value[index] for key, value in splits.items()} for index in (0, 1))
    return (
        partial(dataset, **train, transforms=train_transforms, **bad_samples),
        partial(dataset, **val, transforms=val_transforms, **bad_samples),
    )


def _coco_sources(values: Mapping[str, Any], input: InputConfig) -> tuple[DatasetSource, DatasetSource]:
    _require(values, ("train_images", "train_annotations", "val_images", "val_annotations"), "coco")
    _refuse_shapes_keys(values, "COCO", "a COCO folder's classes are the categories of its annotations")
    return _folder_sources(
        values,
        input,
        CocoDetection,
        image_dir=(values["train_images"], values["val_images"]),
        annotation_file=(values["train_annotations"], values["val_annotations"]),
    )


def _split_names(values: Mapping[str, Any]) -> tuple[str, str]:
    return values.get("train_split") or "train", values.get("val_split") or "val"


def _yolo_sources(values: Mapping[str, Any], input: InputConfig) -> tuple[DatasetSource, DatasetSource]:
    _require(values, ("root",), "yolo")
    _refuse_shapes_keys(values, "YOLO", "a YOLO folder's classes are the names of its data.yaml")
    return _folder_sources(values, input, YoloDetection, root=(values["root"],) * 2, split=_split_names(values))


def _voc_sources(values: Mapping[str, Any], input: InputConfig) -> tuple[DatasetSource, DatasetSource]:
    _require(values, ("root",), "voc")
    _refuse_shapes_keys(values, "VOC", None)
    options = {key: (values[key],) * 2 for key in ("classes", "difficult") if values.get(key) is not None}
    return _folder_sources(
        values, input, VocDetection, root=(values["root"],) * 2, split=_split_names(values), **options
    )


def build_datamodule(cfg: Any, input: InputConfig | None = None) -> DetectionDataModule:
    """A DetectionDataModule from a data config (mapping, DictConfig or dataclass), its images prepared as the
    detector's ``input`` record says (None: DETR's, ImageNet-normalised and resized by the shorter side).

    Fields: kind ("shapes" | "coco" | "yolo" | "voc") and the loader fields of DetectionDataModule; shapes adds
    train_size, val_size (image counts), min_size, max_size (image sides), max_objects, cache, classes; coco adds
    train_images, train_annotations, val_images, val_annotations; yolo adds root, train_split, val_split (keys of
    its data.yaml); voc adds root, train_split, val_split (files of ImageSets/Main), classes and difficult (drop |
    keep); the three add scales, max_resize (longest side after resizing), val_resize (the shorter side at
    evaluation) and bad_samples (error | skip: what an unreadable image does, data/bad_samples.py). Unset optional fields keep the defaults of the classes they feed.
    """
    values = _plain(cfg)
    builders = {"shapes": _shapes_sources, "coco": _coco_sources, "yolo": _yolo_sources, "voc": _voc_sources}
    kind = values.get("kind")
    if kind not in builders:
        raise ValueError(f"unknown data kind {kind!r}; valid kinds: {', '.join(DATA_KINDS)}")
    check_bad_samples(values.get("bad_samples", "skip"), values.get("max_bad_fraction", 0.0))
    train, val = builders[kind](values, input or InputConfig())
    return DetectionDataModule(train, val, **_present(values, {field: field for field in LOADER_FIELDS}))
