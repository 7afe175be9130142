"""The heads this package knows, one ``HeadRecord`` each: adding a head is adding its folder, its record here and
its conf/model/ file. Every list of heads (schemas for Hydra, published layouts for ``init_from`` and the
loaders, the sources named in their messages) is derived from these records.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ..config import JoinerConfig
from ..validation import require, structured
from .building import DetectorConfig
from .criterion import BaseSetCriterion
from .deformable import DeformableDetrConfig, build_deformable_detr
from .deformable.hugging_face import HUGGING_FACE_DEFORMABLE_DETR
from .deformable.weights import DEFORMABLE_DETR_CHECKPOINT, DeformableArchitecture
from .detr import DetrConfig, build_detr
from .detr.criterion import detr_criterion
from .detr.weights import DETR_CHECKPOINT, HUGGING_FACE_DETR, DetrArchitecture
from .dfine import DFineConfig, build_dfine
from .dfine.criterion import dfine_criterion
from .dfine.hugging_face import HUGGING_FACE_DFINE
from .dfine.weights import DFINE_CHECKPOINT, DFineArchitecture
from .dino import DinoConfig, build_dino, dino_criterion
from .dino.weights import DINO_CHECKPOINT, DinoArchitecture
from .head import Detector, HeadConfig
from .hugging_face import HuggingFaceLayout
from .multiscale.criterion import focal_criterion
from .published import DetectorWeights, PublishedArchitecture
from .realtime import varifocal_criterion
from .rtdetrv2 import RtDetrV2Config, build_rtdetrv2
from .rtdetrv2.hugging_face import HUGGING_FACE_RTDETR, HUGGING_FACE_RTDETRV2
from .rtdetrv2.weights import RTDETRV2_CHECKPOINT, RtDetrV2Architecture

# what the package gives every builder besides the schema's fields
INJECTED = ("backbone", "num_classes", "hidden_dim")
DENOISING_COMPILE_NOTE = (
    "{head} builds its denoising queries from each batch's boxes, whose number changes from batch to batch, so "
    "training compiles new graphs at nearly every step and compiling will not pay (docs/performance.md#compile)"
)


class FileLayout(Protocol):
    """A published file layout: its content read as a detector's weights, None when it is another layout's."""

    @property
    def described(self) -> str: ...

    def read(self, content: Any, path: str | os.PathLike) -> DetectorWeights | None: ...


@dataclass(frozen=True)
class HeadRecord:
    """One head: its schema (conf/model/'s ``/schema/<name>``), the builder its ``_target_`` names, its criterion
    (built from the schema), its conf/model/ presets, and the published weights it reads, if any: the
    ``architecture`` they are described with, file layouts and a folder layout (Hugging Face's)."""

    name: str
    schema: type[HeadConfig]
    builder: Callable[..., Detector]
    criterion: Callable[[Any, int, Callable[[Tensor], Tensor]], BaseSetCriterion]
    presets: tuple[str, ...]
    architecture: type[PublishedArchitecture] | None = None
    files: tuple[FileLayout, ...] = ()
    folders: tuple[HuggingFaceLayout, ...] = ()
    compile_note: str | None = None  # why model.compile will not pay in training, said before compiling

    def __post_init__(self) -> None:
        check_builder(self.schema, self.builder)

    @property
    def sources(self) -> list[str]:
        """The published weights the head reads, in words."""
        layouts = [*self.files, *self.folders]
        return list(dict.fromkeys(layout.described for layout in layouts))


def check_builder(schema: type[HeadConfig], builder: Callable[..., Any]) -> None:
    """The builder takes exactly the schema's fields (less its training fields) and what the package injects:
    a field it does not take, or a parameter the schema does not give, is a TypeError here, not a field dropped."""
    parameters = inspect.signature(builder).parameters
    taken = set(parameters) - set(INJECTED)
    given = set(schema.builder_fields())
    missing_injected = [name for name in INJECTED if name not in parameters]
    if taken != given or missing_injected:
        raise TypeError(
            f"{schema.__name__} and its builder {builder.__qualname__} disagree: fields the builder does not take: "
            f"{sorted(given - taken) or 'none'}; parameters no field gives: {sorted(taken - given) or 'none'}; "
            f"injected parameters it lacks: {missing_injected or 'none'}"
        )


HEADS: dict[str, HeadRecord] = {
    record.name: record
    for record in (
        HeadRecord(
            name="detr",
            schema=DetrConfig,
            builder=build_detr,
            criterion=detr_criterion,
            presets=("detr", "detr_small"),
            architecture=DetrArchitecture,
            files=(DETR_CHECKPOINT, HUGGING_FACE_DETR),
            folders=(HUGGING_FACE_DETR,),
        ),
        HeadRecord(
            name="deformable_detr",
            schema=DeformableDetrConfig,
            builder=build_deformable_detr,
            criterion=focal_criterion,
            presets=("deformable_detr", "deformable_detr_small"),
            architecture=DeformableArchitecture,
            files=(DEFORMABLE_DETR_CHECKPOINT, HUGGING_FACE_DEFORMABLE_DETR),
            folders=(HUGGING_FACE_DEFORMABLE_DETR,),
        ),
        HeadRecord(
            name="dino",
            schema=DinoConfig,
            builder=build_dino,
            criterion=dino_criterion,
            presets=("dino", "dino_small"),
            architecture=DinoArchitecture,
            files=(DINO_CHECKPOINT,),
            compile_note=DENOISING_COMPILE_NOTE.format(head="DINO"),
        ),
        HeadRecord(
            name="rtdetrv2",
            schema=RtDetrV2Config,
            builder=build_rtdetrv2,
            criterion=varifocal_criterion,
            presets=("rtdetrv2", "rtdetrv2_small"),
            architecture=RtDetrV2Architecture,
            files=(RTDETRV2_CHECKPOINT, HUGGING_FACE_RTDETRV2, HUGGING_FACE_RTDETR),
            folders=(HUGGING_FACE_RTDETRV2, HUGGING_FACE_RTDETR),
            compile_note=DENOISING_COMPILE_NOTE.format(head="RT-DETRv2"),
        ),
        HeadRecord(
            name="dfine",
            schema=DFineConfig,
            builder=build_dfine,
            criterion=dfine_criterion,
            presets=("dfine", "dfine_small"),
            architecture=DFineArchitecture,
            files=(DFINE_CHECKPOINT, HUGGING_FACE_DFINE),
            folders=(HUGGING_FACE_DFINE,),
            compile_note=DENOISING_COMPILE_NOTE.format(head="D-FINE"),
        ),
    )
}


def record_of(head: HeadConfig) -> HeadRecord:
    """The record of a head's schema."""
    found = next((record for record in HEADS.values() if type(head) is record.schema), None)
    require(found is not None, f"{type(head).__name__} is not the schema of a registered head ({', '.join(HEADS)})")
    return found


def head_config(values: Any) -> HeadConfig:
    """A model node as the schema of its ``_target_`` (DETR's when it names none: older checkpoints)."""
    schemas = {record.schema._target_: record.schema for record in HEADS.values()}  # by the _target_ each builds with
    if isinstance(values, HeadConfig) and type(values) is schemas.get(values._target_):
        return values
    if dataclasses.is_dataclass(values):
        values = dataclasses.asdict(values)
    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=True)
    values = values or {}
    target = values.get("_target_", DetrConfig._target_)
    require(target in schemas, f"model._target_={target!r} is not one of {', '.join(schemas)}")
    return structured(schemas[target], values, "model")


def detector_config(
    joiner: Any, head: Any, num_classes: int, class_names: Sequence[str] | None = None
) -> DetectorConfig:
    """A ``DetectorConfig`` from plain values (a checkpoint's hyperparameters, a composed config's nodes) or
    schemas, each part typed once."""
    names = None if class_names is None else [str(name) for name in class_names]
    return DetectorConfig(JoinerConfig.from_args(joiner), head_config(head), num_classes, names)


def build_detector(joiner: Any, head: Any, num_classes: int) -> Detector:
    """The detector of a Joiner config and a head config (schemas or plain values), untrained."""
    return detector_config(joiner, head, num_classes).build()


def build_criterion(config: DetectorConfig, num_boxes_reduce: Callable[[Tensor], Tensor]) -> BaseSetCriterion:
    """The set loss of a detector's head; ``num_boxes_reduce``: see ``BaseSetCriterion``."""
    return record_of(config.head).criterion(config.head, config.num_classes, num_boxes_reduce)


def published_sources() -> str:
    """Every published layout the heads read, in words ("a DETR checkpoint, ... or a DINO checkpoint")."""
    sources = [source for record in HEADS.values() for source in record.sources]
    return " or ".join([", ".join(sources[:-1]), sources[-1]] if len(sources) > 1 else sources)


def published_weights(content: Any, path: str | os.PathLike) -> DetectorWeights | None:
    """The weights of a file's content in any head's published layout, None if it is in none."""
    layouts = (layout for record in HEADS.values() for layout in record.files)
    return next((weights for layout in layouts if (weights := layout.read(content, path)) is not None), None)


def published_folder(folder: str | os.PathLike) -> DetectorWeights:
    """The weights of a published model's folder (Hugging Face's layout) for any head."""
    layouts = [layout for record in HEADS.values() for layout in record.folders]
    weights = next((weights for layout in layouts if (weights := layout.read_folder(folder)) is not None), None)
    require(
        weights is not None,
        f"{os.fspath(folder)!r} holds no model this package reads: its config.json names another model_type than "
        + " or ".join(layout.model_type for layout in layouts),
    )
    return weights
