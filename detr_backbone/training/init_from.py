"""``init_from``: a new run whose detector starts from another detector's weights (fine-tuning).

Unlike ``ckpt_path`` (resume: step, optimizer, schedule, data order) only weights are taken, and
training starts at step 0. Sources are told apart by content: DETR's checkpoints and Hugging Face
DETR folders (the DETR head's layouts, ``detection.detr.weights``), and checkpoints written by train.py. What differs between
the checkpoint and the run by design is adapted by meaning:

- class rows by class name (case-insensitive): a dataset class the checkpoint knows gets its row,
  the others keep a fresh head's rows, and the no-object row is the checkpoint's;
- object queries: the first ``model.num_queries`` of the checkpoint's.

Anything else must fit exactly; otherwise the run fails before training with the first
mismatching keys and the overrides of a config that fits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn

from ..config import BACKBONE_TARGETS, POSITION_TARGETS, own_kind
from ..detection import published_folder, published_weights
from ..detection.coco_names import UNUSED
from ..detection.detr.weights import Architecture, DetectorWeights, architecture_of_state, is_detr_state
from ..inference.checkpoint import TRAINING_PREFIX
from ..weights import (
    CheckpointMismatchError,
    LoadReport,
    first_keys,
    load_weights_file,
    match_keys,
)
from .config import Config
from .init_report import CarriedClass, InitReport

REPORT_FILE = "init_from.txt"
OWN_SOURCE = "train.py checkpoint"
CLASS_WEIGHT, CLASS_BIAS, QUERIES = "class_embed.weight", "class_embed.bias", "query_embed.weight"
ADAPTED = (CLASS_WEIGHT, CLASS_BIAS, QUERIES)  # reported apart from the tensors loaded as they are
# Architecture field -> the override that sets it; num_queries is absent: a checkpoint may have more
OVERRIDES = {
    "backbone_kind": "backbone._target_",
    "backbone_name": "backbone.name",
    "main_layer": "backbone.main_layer",
    "dilation": "dilation",
    "position": "position",
    "hidden_dim": "hidden_dim",
    "enc_layers": "model.enc_layers",
    "dec_layers": "model.dec_layers",
    "dim_feedforward": "model.dim_feedforward",
    "nheads": "model.nheads",
    "pre_norm": "model.pre_norm",
}
UNSEEN_IN_SHAPES = ("dilation", "nheads")  # checked against what the source records; tensors look the same


def read_init_weights(path: str | os.PathLike) -> DetectorWeights:
    """The weights at ``path``: a DETR checkpoint, a Hugging Face DETR folder or file, or a train.py checkpoint."""
    if os.path.isdir(path):
        return published_folder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"init_from={os.fspath(path)!r} does not exist")
    content = load_weights_file(path)
    weights = own_checkpoint_weights(content, path) or published_weights(content, path)
    if weights is None:
        raise ValueError(
            f"init_from={os.fspath(path)!r} is not a detector checkpoint: expected DETR's ({{'model': ...}} with "
            "backbone.0.body.*, transformer.*, class_embed.*), a Hugging Face DETR (model.backbone.*, "
            "class_labels_classifier.*, with its config.json) or a train.py checkpoint"
        )
    return weights


def own_checkpoint_weights(content: Any, path: str | os.PathLike) -> DetectorWeights | None:
    """The detector of a Lightning checkpoint written by train.py, None if ``content`` is none."""
    if not isinstance(content, Mapping) or not isinstance(content.get("state_dict"), Mapping):
        return None
    saved = content["state_dict"]
    state = {
        key.removeprefix(TRAINING_PREFIX): value for key, value in saved.items() if key.startswith(TRAINING_PREFIX)
    }
    if not is_detr_state(state):
        return None
    hparams = content.get("hyper_parameters") or {}
    names = hparams.get("class_names")  # absent from checkpoints written before names were saved
    return DetectorWeights(
        OWN_SOURCE,
        os.fspath(path),
        state,
        None if names is None else list(names),
        architecture_of_hyperparameters(hparams, state),
        skipped=[key for key in saved if not key.startswith(TRAINING_PREFIX)],
    )


def architecture_of_hyperparameters(hparams: Mapping[str, Any], state: Mapping[str, Tensor]) -> Architecture:
    """What DetrModule's saved config says, over what the shapes show."""
    joiner, head = hparams.get("joiner") or {}, hparams.get("head") or {}
    backbone, position = joiner.get("backbone") or {}, joiner.get("position") or {}
    stated = {
        "backbone_kind": own_kind(backbone.get("_target_", ""), BACKBONE_TARGETS) or backbone.get("kind"),
        "backbone_name": backbone.get("name"),
        "main_layer": -1 if backbone.get("return_interm_layers") else last_level(backbone.get("main_layer")),
        "dilation": backbone.get("dilation"),
        "position": own_kind(position.get("_target_", ""), POSITION_TARGETS) or position.get("kind"),
        "hidden_dim": joiner.get("hidden_dim"),
        **{name: head.get(name) for name in ("enc_layers", "dec_layers", "dim_feedforward", "nheads", "pre_norm")},
    }
    return replace(architecture_of_state(state), **{name: value for name, value in stated.items() if value is not None})


def last_level(main_layer: int | None) -> int | None:
    """``backbone.main_layer`` counted from the end (0..3 and -4..-1 both index the four levels)."""
    return None if main_layer is None else main_layer % 4 - 4


def configured_architecture(cfg: Config) -> Architecture:
    """The detector ``cfg`` builds, in the terms weights are described in."""
    backbone, head = cfg.backbone, cfg.model
    return Architecture(
        backbone_kind=backbone.kind,
        backbone_name=getattr(backbone, "name", None),  # a backbone of the user's own has no name of ours
        main_layer=-1 if backbone.return_interm_layers else last_level(backbone.main_layer),
        dilation=getattr(backbone, "dilation", False),
        position=cfg.position.kind,
        hidden_dim=cfg.hidden_dim,
        enc_layers=head.enc_layers,
        dec_layers=head.dec_layers,
        dim_feedforward=head.dim_feedforward,
        nheads=head.nheads,
        pre_norm=head.pre_norm,
        num_queries=head.num_queries,
    )


def fitting_overrides(
    checkpoint: Architecture, configured: Architecture, names: Sequence[str] = tuple(OVERRIDES)
) -> list[str]:
    """``key=value`` overrides that make the configured detector the checkpoint's, where the checkpoint says."""
    overrides = []
    for name in names:
        wanted = getattr(checkpoint, name)
        if wanted is not None and wanted != getattr(configured, name):
            if name == "backbone_kind":
                wanted = BACKBONE_TARGETS[wanted]
            overrides.append(f"{OVERRIDES[name]}={str(wanted).lower() if isinstance(wanted, bool) else wanted}")
    return overrides


def class_key(name: object) -> str:
    """Class names match case-insensitively, surrounding spaces ignored."""
    return str(name).strip().casefold()


def carry_class_rows(
    fresh: tuple[Tensor, Tensor], weights: DetectorWeights, class_names: Sequence[str]
) -> tuple[Tensor, Tensor, list[CarriedClass]]:
    """The class head for ``class_names``: rows of the classes the checkpoint names, fresh rows for the
    others, and the checkpoint's no-object row (the last)."""
    weight, bias = (tensor.detach().clone() for tensor in fresh)
    source_weight, source_bias = weights.state[CLASS_WEIGHT], weights.state[CLASS_BIAS]
    rows: dict[str, int] = {}
    for row, name in enumerate(weights.class_names or []):
        if class_key(name) != class_key(UNUSED):
            rows.setdefault(class_key(name), row)  # the first row of a name repeated
    carried = []
    for label, name in enumerate(class_names):
        row = rows.get(class_key(name))
        if row is not None:
            weight[label], bias[label] = source_weight[row], source_bias[row]
            carried.append(CarriedClass(str(name), row, weights.class_names[row]))
    weight[-1], bias[-1] = source_weight[-1], source_bias[-1]
    return weight, bias, carried


def kept_queries(weights: DetectorWeights, wanted: int) -> Tensor:
    """The first ``wanted`` object queries; a checkpoint with fewer is an error that says what to set."""
    queries = weights.state[QUERIES]
    if queries.shape[0] < wanted:
        raise ValueError(
            f"init_from={weights.path!r} has {queries.shape[0]} object queries but model.num_queries={wanted}: "
            f"set model.num_queries={queries.shape[0]} or fewer (the checkpoint's first queries are kept)"
        )
    return queries[:wanted]


def adapted_state(
    detector: nn.Module, weights: DetectorWeights, class_names: Sequence[str], cfg: Config
) -> tuple[dict[str, Tensor], InitReport]:
    """The state to load into ``detector`` and the report of it; raises when the checkpoint does not fit."""
    expected = detector.state_dict()
    # in the model's order, so that a mismatch names the first key as the model lists them
    state = {key: weights.state[key] for key in expected if key in weights.state} | weights.state
    carried: list[CarriedClass] = []
    if state[CLASS_WEIGHT].shape[1:] == expected[CLASS_WEIGHT].shape[1:] and CLASS_BIAS in state:
        state[CLASS_WEIGHT], state[CLASS_BIAS], carried = carry_class_rows(
            (expected[CLASS_WEIGHT], expected[CLASS_BIAS]), weights, class_names
        )
    state[QUERIES] = kept_queries(weights, cfg.model.num_queries)
    load = LoadReport(weights.path)
    try:
        fitting = match_keys(detector, state, load, "", skip_foreign=False)
    except CheckpointMismatchError as error:
        raise mismatch(weights, cfg, str(error).removeprefix(f"{weights.path}: ")) from None
    unseen = fitting_overrides(weights.architecture, configured_architecture(cfg), UNSEEN_IN_SHAPES)
    problems = [f"missing from the checkpoint: {first_keys(load.missing)}"] if load.missing else []
    problems += [f"not in the configured detector: {first_keys(load.unexpected)}"] if load.unexpected else []
    problems += [f"the checkpoint has {override}" for override in unseen]
    if problems:
        raise mismatch(weights, cfg, "; ".join(problems))
    carried_names = {c.name for c in carried}
    report = InitReport(
        path=weights.path,
        source=weights.source,
        architecture=weights.architecture,
        class_rows=weights.num_class_rows,
        loaded=sum(key not in ADAPTED for key in fitting),
        queries=(cfg.model.num_queries, weights.state[QUERIES].shape[0]),
        carried=carried,
        new_classes=[str(name) for name in class_names if str(name) not in carried_names],
        skipped=weights.skipped,
        notes=notes(weights, cfg),
    )
    return fitting, report


def mismatch(weights: DetectorWeights, cfg: Config, details: str) -> CheckpointMismatchError:
    overrides = fitting_overrides(weights.architecture, configured_architecture(cfg))
    fits = " ".join(overrides) or f"none found in what the {weights.source} records"
    return CheckpointMismatchError(
        f"init_from={weights.path!r} ({weights.source}: {weights.architecture}) does not fit the configured detector: "
        f"{details}; a config that fits: {fits}"
    )


def notes(weights: DetectorWeights, cfg: Config) -> list[str]:
    found = []
    if weights.class_names is None:
        found.append(f"the checkpoint does not name its {weights.num_class_rows} classes: every class row starts fresh")
    if weights.architecture.dilation is None:
        found.append(
            f"{weights.source}s do not record dilation: this run uses dilation={str(cfg.backbone.dilation).lower()}, "
            "which must match the checkpoint's (DC5 weights need dilation=true)"
        )
    if cfg.backbone.pretrained or cfg.backbone.checkpoint:
        found.append("backbone.pretrained and backbone.checkpoint were not read: init_from sets every weight")
    return found


def without_backbone_weights(cfg: Config) -> Config:
    """``cfg`` without the backbone's own weight sources, for a detector whose weights init_from replaces."""
    return replace(cfg, backbone=replace(cfg.backbone, pretrained=False, checkpoint=None))


def initialize_from(
    detector: nn.Module, cfg: Config, class_names: Sequence[str], run_dir: str | os.PathLike
) -> InitReport:
    """Load ``cfg.init_from`` into ``detector``; print the report and write it to ``<run_dir>/init_from.txt``."""
    weights = read_init_weights(cfg.init_from)
    state, report = adapted_state(detector, weights, class_names, cfg)
    detector.load_state_dict(state, strict=False)  # match_keys checked every key: nothing is missing or left
    rank_zero_info(str(report))
    if rank_zero_only.rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / REPORT_FILE).write_text(str(report) + "\n")
    return report
