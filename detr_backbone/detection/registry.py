"""The heads this package knows: adding a head is adding its folder and one line here."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..validation import require, structured
from .deformable.config import DeformableDetrConfig
from .detr.config import DetrConfig
from .dino.config import DinoConfig
from .head import HeadConfig
from .published import DetectorWeights

# conf/model/'s schema name (`/schema/<name>`) -> the head's schema
HEADS: dict[str, type[HeadConfig]] = {
    "detr": DetrConfig,
    "deformable_detr": DeformableDetrConfig,
    "dino": DinoConfig,
}


def head_config(values: Any) -> HeadConfig:
    """A model node as the schema of its ``_target_`` (DETR's when it names none: older checkpoints)."""
    schemas = {schema._target_: schema for schema in HEADS.values()}  # by the _target_ each builds with
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


def published_weights(content: Any, path: str | os.PathLike) -> DetectorWeights | None:
    """The weights of a file's content in any head's published layout, None if it is in none."""
    return next((w for head in HEADS.values() if (w := head.published_weights(content, path)) is not None), None)


def published_folder(folder: str | os.PathLike) -> DetectorWeights:
    """The weights of a published model's folder (Hugging Face's layout) for any head."""
    weights = next((w for head in HEADS.values() if (w := head.published_folder(folder)) is not None), None)
    require(
        weights is not None,
        f"{os.fspath(folder)!r} holds no model this package reads: its config.json names another model_type than "
        "detr or deformable_detr",
    )
    return weights
