"""Checks shared by every config schema: a condition with its message, and values typed against a schema."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def require(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition: the checks of every config schema."""
    if not condition:
        raise ValueError(message)


Schema = TypeVar("Schema")


def structured(schema: type[Schema], values: Any, where: str) -> Schema:
    """``values`` checked against ``schema``: unknown keys and wrong types fail with the key's name."""
    if isinstance(values, schema):
        return values
    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=True)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        valid = ", ".join(sorted((f.name for f in fields(schema)), key=lambda name: name != "_target_"))
        message = str(error).splitlines()[0]
        raise ValueError(f"invalid {where} config: {message} (valid keys: {valid})") from None
