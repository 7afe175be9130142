"""A warning for runs that mix the default job's CPU settings with a COCO-sized setup: changing ``model=``
or ``data=`` alone keeps the rest of the default job (hidden_dim 128, a randomly initialised backbone,
the shapes data), which trains, but not what anyone means by it."""

from __future__ import annotations

from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from ..data.datamodule import FOLDER_KINDS
from .config import Config

COCO_SIZED_HIDDEN_DIM, COCO_SIZED_QUERIES = 256, 100  # DETR's published sizes; Deformable DETR has 300 queries
PRESETS = "experiment=dino_r50_coco, experiment=deformable_detr_r50_coco or experiment=detr_r50_coco"


class RecipeWarning(UserWarning):
    """The run combines a COCO-sized model with the shapes data, or a folder of its own (COCO, YOLO, VOC) with
    the CPU default job's model."""


def coco_sized(config: Config) -> list[str]:
    """The settings that make the model COCO-sized, as overrides."""
    sized = [f"hidden_dim={config.hidden_dim}"] if config.hidden_dim >= COCO_SIZED_HIDDEN_DIM else []
    queries = getattr(config.model, "num_queries", 0)
    return sized + ([f"model.num_queries={queries}"] if queries >= COCO_SIZED_QUERIES else [])


def recipe_mismatch(config: Config) -> str | None:
    """What is mismatched between the model and the data, in one line; None when nothing is."""
    sized = coco_sized(config)
    if config.data.kind == "shapes" and sized:
        return (
            f"{' and '.join(sized)} on data=shapes: a COCO-sized model on the embedded shapes data (a few shapes "
            f"on {config.data.min_size}-{config.data.max_size} px images), sized for the default job's model "
            "(model=dino_small, hidden_dim=128); "
            f"for your own data give data=coco, data=yolo or data=voc with its folder, or {PRESETS}"
        )
    if config.data.kind in FOLDER_KINDS and not sized:
        random = (
            getattr(config.backbone, "pretrained", True) is False
            and not getattr(config.backbone, "checkpoint", None)
            and config.init_from is None
        )
        start = ", and a backbone of random weights (backbone.pretrained=false)" if random else ""
        return (
            f"data={config.data.kind} with the CPU default job's model (hidden_dim={config.hidden_dim}, "
            f"model.num_queries={getattr(config.model, 'num_queries', '?')}{start}); the published recipes: {PRESETS}"
        )
    return None


def warn_of_recipe_mismatch(config: Config) -> None:
    message = recipe_mismatch(config)
    if message is not None:
        rank_zero_warn(message, category=RecipeWarning)
