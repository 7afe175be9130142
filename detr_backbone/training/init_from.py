"""``init_from``: a new run whose detector starts from another detector's weights (fine-tuning).

Unlike ``ckpt_path`` (resume: step, optimizer, schedule, data order) only weights are taken, and
training starts at step 0. Sources are told apart by content: each head's published layouts
(``detection.registry``) and checkpoints written by train.py. What differs between the checkpoint
and the run by design is adapted by meaning:

- class rows by class name (case-insensitive, else through a synonym of ``class_synonyms``: COCO's
  "tv" is Objects365's "Moniter/TV"), in every copy of the class head (one per decoder layer in
  Deformable DETR): a dataset class the checkpoint knows gets its row, the others keep a fresh head's
  rows, and a no-object row (DETR) is the checkpoint's;
- tables with a row per class and some extra rows (DINO's ``label_enc``), as the class heads;
- object queries (DINO: their learned content): the first ``model.num_queries`` of the checkpoint's.

Anything else must fit exactly; otherwise the run fails before training with the first
mismatching keys and the overrides of a config that fits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn

from ..detection import (
    DetectorConfig,
    DetectorWeights,
    published_folder,
    published_sources,
    published_weights,
    record_of,
)
from ..detection.class_synonyms import SYNONYMS
from ..detection.coco_names import UNUSED
from ..detection.published import fitting_overrides
from ..inference.checkpoint import TRAINING_PREFIX, detector_state, saved_detector_config
from ..weights import CheckpointMismatchError, LoadReport, first_keys, load_weights_file, match_keys
from .config import Config
from .init_report import CarriedClass, InitReport

REPORT_FILE = "init_from.txt"
OWN_SOURCE = "train.py checkpoint"


def read_init_weights(path: str | os.PathLike) -> DetectorWeights:
    """The weights at ``path``: a train.py checkpoint, or any head's published file or folder (``published_sources``)."""
    if os.path.isdir(path):
        return published_folder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"init_from={os.fspath(path)!r} does not exist")
    content = load_weights_file(path)
    weights = own_checkpoint_weights(content, path) or published_weights(content, path)
    if weights is None:
        raise ValueError(
            f"init_from={os.fspath(path)!r} is not a detector checkpoint: expected a train.py checkpoint, "
            f"{published_sources()}"
        )
    return weights


def own_checkpoint_weights(content: Any, path: str | os.PathLike) -> DetectorWeights | None:
    """The detector of a Lightning checkpoint written by train.py (any head), None if ``content`` is none."""
    config = saved_detector_config(content)
    if config is None:
        return None
    architecture = record_of(config.head).architecture
    if architecture is None:
        raise ValueError(
            f"init_from={os.fspath(path)!r} holds a {head_name(config)} detector, which init_from cannot read"
        )
    state = detector_state(content)
    skipped = [key for key in content["state_dict"] if not key.startswith(TRAINING_PREFIX)]
    return DetectorWeights(
        OWN_SOURCE, os.fspath(path), state, config.class_names, architecture.configured(config), skipped=skipped
    )


def head_name(config: DetectorConfig) -> str:
    """The conf/model/ name of a config's head."""
    return record_of(config.head).name


def class_key(name: object) -> str:
    """Class names match case-insensitively, surrounding spaces ignored."""
    return str(name).strip().casefold()


# a name's key -> the keys of its synonyms, in the table's order
SYNONYM_KEYS: dict[str, tuple[str, ...]] = {
    class_key(name): tuple(class_key(other) for other in group if other != name) for group in SYNONYMS for name in group
}


def class_rows(checkpoint_names: Sequence[str] | None, class_names: Sequence[str]) -> list[CarriedClass]:
    """The dataset classes the checkpoint names, each with its row there (the first of a name repeated): by
    the class's own name, else by the first of its synonyms the checkpoint has."""
    rows: dict[str, int] = {}
    for row, name in enumerate(checkpoint_names or []):
        if class_key(name) != class_key(UNUSED):
            rows.setdefault(class_key(name), row)
    carried = []
    for name in class_names:
        own = class_key(name)
        found = next((key for key in (own, *SYNONYM_KEYS.get(own, ())) if key in rows), None)
        if found is not None:
            row = rows[found]
            carried.append(CarriedClass(str(name), row, str(checkpoint_names[row]), synonym=found != own))
    return carried


def carry_class_rows(
    fresh: Tensor, source: Tensor, carried: Sequence[CarriedClass], class_names: Sequence[str], no_object_rows: int
) -> Tensor:
    """A class head's weight or bias for ``class_names``: the checkpoint's rows of the classes it names, a
    fresh head's rows for the others, and the checkpoint's no-object rows (the last ``no_object_rows``)."""
    rows = fresh.detach().clone()
    labels = {str(name): label for label, name in enumerate(class_names)}
    for carry in carried:
        rows[labels[carry.name]] = source[carry.row]
    if no_object_rows:
        rows[-no_object_rows:] = source[-no_object_rows:]
    return rows


def kept_queries(weights: DetectorWeights, wanted: int, key: str) -> Tensor:
    """The first ``wanted`` object queries; a checkpoint with fewer is an error that says what to set."""
    queries = weights.state[key]
    if queries.shape[0] < wanted:
        raise ValueError(
            f"init_from={weights.path!r} has {queries.shape[0]} object queries but model.num_queries={wanted}: "
            f"set model.num_queries={queries.shape[0]} or fewer (the checkpoint's first queries are kept)"
        )
    return queries[:wanted]


def check_head(weights: DetectorWeights, config: DetectorConfig) -> None:
    """Weights of another head than the run's are one line naming the head that reads them."""
    if type(weights.architecture) is not record_of(config.head).architecture:
        found = weights.architecture.HEAD
        raise CheckpointMismatchError(
            f"init_from={weights.path!r} holds a {found} detector ({weights.source}) but the run's model is "
            f"{head_name(config)}: set model={found} (or a preset of it, e.g. model={found}_small)"
        )


def adapted_state(
    detector: nn.Module, weights: DetectorWeights, config: DetectorConfig, cfg: Config
) -> tuple[dict[str, Tensor], InitReport]:
    """The state to load into ``detector`` and the report of it; raises when the checkpoint does not fit."""
    check_head(weights, config)
    expected = detector.state_dict()
    # in the model's order, so that a mismatch names the first key as the model lists them
    state = {key: weights.state[key] for key in expected if key in weights.state} | weights.state
    class_names = config.class_names or []
    carried = class_rows(weights.class_names, class_names)
    no_object = weights.architecture.NO_OBJECT_ROWS
    adapted = []
    for head in weights.class_heads:
        keys = [f"{head}.weight", f"{head}.bias"]
        if (
            all(key in expected and key in state for key in keys)
            and state[keys[0]].shape[1:] == expected[keys[0]].shape[1:]
        ):
            for key in keys:
                state[key] = carry_class_rows(expected[key], state[key], carried, class_names, no_object)
            adapted += keys
    class_tables = {}
    for key, extra_rows in weights.architecture.CLASS_TABLES.items():
        if key in expected and key in state and state[key].shape[1:] == expected[key].shape[1:]:
            state[key] = carry_class_rows(expected[key], state[key], carried, class_names, extra_rows)
            adapted.append(key)
            class_tables[key] = extra_rows
    queries, query_key = None, weights.architecture.QUERIES
    if query_key in state and query_key in expected:
        state[query_key] = kept_queries(weights, config.head.num_queries, query_key)
        queries, adapted = (config.head.num_queries, weights.state[query_key].shape[0]), [*adapted, query_key]
    load = LoadReport(weights.path)
    try:
        fitting = match_keys(detector, state, load, "", skip_foreign=False)
    except CheckpointMismatchError as error:
        raise mismatch(weights, config, str(error).removeprefix(f"{weights.path}: ")) from None
    configured = type(weights.architecture).configured(config)
    unseen = fitting_overrides(weights.architecture, configured, weights.architecture.UNSEEN_IN_SHAPES)
    problems = [f"missing from the checkpoint: {first_keys(load.missing)}"] if load.missing else []
    problems += [f"not in the configured detector: {first_keys(load.unexpected)}"] if load.unexpected else []
    problems += [f"the checkpoint has {override}" for override in unseen]
    if problems:
        raise mismatch(weights, config, "; ".join(problems))
    carried_names = {c.name for c in carried}
    report = InitReport(
        path=weights.path,
        source=weights.source,
        architecture=weights.architecture,
        class_rows=weights.num_class_rows,
        loaded=sum(key not in adapted for key in fitting),
        class_heads=[head for head in weights.class_heads if f"{head}.weight" in adapted],
        queries=queries,
        query_key=query_key,
        class_tables=class_tables,
        carried=carried,
        new_classes=[str(name) for name in class_names if str(name) not in carried_names],
        skipped=weights.skipped,
        notes=notes(weights, cfg),
    )
    return fitting, report


def mismatch(weights: DetectorWeights, config: DetectorConfig, details: str) -> CheckpointMismatchError:
    overrides = fitting_overrides(weights.architecture, type(weights.architecture).configured(config))
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


def initialize_from(detector: nn.Module, config: DetectorConfig, cfg: Config, run_dir: str | os.PathLike) -> InitReport:
    """Load ``cfg.init_from`` into ``detector`` (built from ``config``); print the report and write it to
    ``<run_dir>/init_from.txt``."""
    weights = read_init_weights(cfg.init_from)
    state, report = adapted_state(detector, weights, config, cfg)
    detector.load_state_dict(state, strict=False)  # match_keys checked every key: nothing is missing or left
    rank_zero_info(str(report))
    if rank_zero_only.rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / REPORT_FILE).write_text(str(report) + "\n")
    return report
