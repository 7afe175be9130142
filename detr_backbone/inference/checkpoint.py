"""A detector to run, read from a file: a train.py checkpoint, or published weights of any head.

train.py's Lightning checkpoints are read without Lightning: their saved hyperparameters give the
detector's config (typed once), and the detector's tensors are those under ``detector.``. Published
files (DETR's checkpoints, Hugging Face folders) are read by the heads' own layouts (the readers
behind ``init_from``), and the detector is built from what they record about their architecture.
Files are read with ``weights_only=True``: loading cannot run code.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.augment import square_side
from ..detection import (
    Detector,
    DetectorConfig,
    DetectorWeights,
    detector_config,
    published_folder,
    published_sources,
    published_weights,
)
from ..detection.published import published_category_ids
from ..image_input import InputConfig
from ..weights import first_keys, load_weights_file

TRAINING_SOURCE = "train.py checkpoint"
TRAINING_CHECKPOINT = "a Lightning checkpoint of train.py's DetrModule"
TRAINING_PREFIX = "detector."  # the training module's attribute: its detector's keys in a train.py checkpoint
RUN_CONFIG_KEY = "config"  # a train.py checkpoint's copy of its run's composed config (data included)
ANY_CHECKPOINT = f"a train.py checkpoint, {published_sources()}"
DETR_EVAL_SIZE, DETR_EVAL_MAX_SIZE = 800, 1333  # DETR's evaluation resize: shorter side, longer side at most
# the side published weights are evaluated at, by their input record's resize: DETR's shorter side, RT-DETR's square
PUBLISHED_EVAL_SIZES = {"shorter_side": DETR_EVAL_SIZE, "square": 640}


class UnnamedClassesWarning(UserWarning):
    """The checkpoint does not name its classes: they are called "class 0", "class 1", ..."""


@dataclass
class LoadedDetector:
    """A detector in eval mode with what its file says about its classes and its evaluation-time resize.

    ``category_ids[label]`` is the dataset id of each class row: COCO's ids for published COCO
    weights (row i is id i), 1..K for train.py checkpoints (COCO's convention; their files keep
    names, not ids). ``size`` is the side images were evaluated at (None: as they are): the shorter side, or the
    square's, as ``input`` (the detector's record of how it takes its images) says.
    """

    detector: Detector
    class_names: list[str]
    category_ids: list[int]
    source: str
    path: str
    size: int | None
    max_size: int = DETR_EVAL_MAX_SIZE
    names_known: bool = True  # False: the file does not name its classes, ``class_names`` are "class N"
    run_config: Mapping[str, Any] | None = None  # a train.py checkpoint's run config (its data among it)
    input: InputConfig = field(default_factory=InputConfig)

    def __post_init__(self) -> None:
        inference_ready(self.detector)


def read_checkpoint(path: str | os.PathLike, expected: str) -> Any:
    """The content of a checkpoint file; a missing or unreadable file is one line that says what was expected."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {os.fspath(path)}")
    try:
        return load_weights_file(path)
    except IsADirectoryError:
        raise ValueError(f"{os.fspath(path)} is a folder, not {expected}") from None
    except OSError:
        raise
    except Exception as error:  # the unpickler, fed another kind of file, can fail with any error
        cause = error.__cause__ if isinstance(error, ValueError) and error.__cause__ else error
        reason = str(cause).strip().partition("\n")[0]
        raise ValueError(f"{os.fspath(path)} is not {expected} ({type(cause).__name__}: {reason})") from None


def mapped_checkpoint(path: str | os.PathLike) -> Any:
    """A checkpoint's content with its tensors mapped rather than read: for looking at its plain values."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def saved_run_config(path: str | os.PathLike) -> Mapping[str, Any] | None:
    """The run config a train.py checkpoint holds; None for any other file."""
    try:
        content = mapped_checkpoint(path)
    except Exception:  # published weights that need more than plain values to unpickle, or not a checkpoint at all
        return None
    config = content.get(RUN_CONFIG_KEY) if isinstance(content, Mapping) else None
    return config if isinstance(config, Mapping) else None


def saved_detector_config(content: Any) -> DetectorConfig | None:
    """The config of the detector a train.py checkpoint's content holds, None if the content is something else.

    Compilation saved with the run is left off: whoever runs the detector decides that.
    """
    if not isinstance(content, Mapping):
        return None
    hparams, state = content.get("hyper_parameters"), content.get("state_dict")
    if not isinstance(hparams, Mapping) or not isinstance(state, Mapping) or "joiner" not in hparams:
        return None
    config = detector_config(hparams["joiner"], hparams["head"], hparams["num_classes"], hparams.get("class_names"))
    return config.uncompiled()


def buildable_config(
    content: Any, path: str | os.PathLike, allowed_targets: Sequence[str] = ()
) -> DetectorConfig | None:
    """``saved_detector_config``, refused unless every ``_target_`` it names is ours or in ``allowed_targets``."""
    config = saved_detector_config(content)
    if config is not None:
        config.check_targets(allowed_targets, f"checkpoint {os.fspath(path)}")
    return config


def detector_state(content: Mapping[str, Any]) -> dict[str, Any]:
    """The detector's tensors of a train.py checkpoint, under the detector's own names."""
    saved = content["state_dict"]
    return {key.removeprefix(TRAINING_PREFIX): value for key, value in saved.items() if key.startswith(TRAINING_PREFIX)}


def training_detector(
    content: Any, path: str | os.PathLike, allowed_targets: Sequence[str] = ()
) -> tuple[Detector, DetectorConfig] | None:
    """The detector of a train.py checkpoint's content and its config, None if the content is something else.

    It is built only where every ``_target_`` of the saved config is ours or in ``allowed_targets``.
    """
    config = buildable_config(content, path, allowed_targets)
    if config is None:
        return None
    detector = config.build()
    mismatch = key_mismatch(*detector.load_state_dict(detector_state(content), strict=False))
    if mismatch:
        raise ValueError(f"{os.fspath(path)} does not fit the detector its hyperparameters describe: {mismatch}")
    return detector, config


def key_mismatch(missing: list[str], unexpected: list[str]) -> str:
    """The keys a load left missing or unused, in one line; empty when every key matched."""
    parts = [f"missing {first_keys(missing)}"] if missing else []
    return "; ".join(parts + ([f"unexpected {first_keys(unexpected)}"] if unexpected else []))


def named_classes(names: Sequence[str] | None, count: int, path: str | os.PathLike) -> list[str]:
    if names is not None:
        return [str(name) for name in names]
    warnings.warn(
        f"{os.fspath(path)} does not name its {count} classes: they are called 'class 0' to 'class {count - 1}'",
        UnnamedClassesWarning,
        stacklevel=3,
    )
    return [f"class {label}" for label in range(count)]


def published_detector(weights: DetectorWeights, dilation: bool | None) -> tuple[Detector, DetectorConfig]:
    """A detector built from what published weights record about their architecture, with the weights loaded,
    and its config."""
    config = weights.detector_config(dilation)
    detector = config.build()
    mismatch = key_mismatch(*detector.load_state_dict(weights.state, strict=False))
    if mismatch:
        raise ValueError(
            f"{weights.path} ({weights.source}: {weights.architecture}) does not load into the detector it "
            f"describes: {mismatch}"
        )
    return detector, config


def load_detector(
    path: str | os.PathLike, dilation: bool | None = None, allowed_targets: Sequence[str] = ()
) -> LoadedDetector:
    """The detector of a train.py checkpoint or of any head's published file or folder (``published_sources``).

    ``dilation`` is only read for DETR's own checkpoints, which do not record it (DC5 files need True).
    ``allowed_targets``: the ``_target_`` paths outside this package (a backbone of your own) that a
    train.py checkpoint's saved config may build; anything else there is refused, never imported.
    """
    if os.path.isdir(path):
        weights = published_folder(path)
    else:
        content = read_checkpoint(path, ANY_CHECKPOINT)
        trained = training_detector(content, path, allowed_targets)
        if trained is not None:
            detector, config = trained
            names = named_classes(config.class_names, config.num_classes, path)
            ids = list(range(1, config.num_classes + 1))
            known = config.class_names is not None
            run_config = content.get(RUN_CONFIG_KEY) if isinstance(content.get(RUN_CONFIG_KEY), Mapping) else None
            record = config.head.input
            return LoadedDetector(
                detector,
                names,
                ids,
                TRAINING_SOURCE,
                os.fspath(path),
                training_eval_size(record, run_config),
                names_known=known,
                run_config=run_config,
                input=record,
            )
        weights = published_weights(content, path)
        if weights is None:
            raise ValueError(f"{os.fspath(path)} is not {ANY_CHECKPOINT}: none of their layouts matches its keys")
    detector, config = published_detector(weights, dilation)
    names = named_classes(weights.class_names, weights.num_class_rows, path)
    ids = published_category_ids(weights.num_class_rows)
    known = weights.class_names is not None
    record = config.head.input
    size = PUBLISHED_EVAL_SIZES[record.resize]
    return LoadedDetector(detector, names, ids, weights.source, os.fspath(path), size, names_known=known, input=record)


def training_eval_size(record: InputConfig, run_config: Mapping[str, Any] | None) -> int | None:
    """The side a train.py run evaluated at: none (its validation images as they are, the shapes data's way) for a
    detector resized by its shorter side; the square side of the run's data for one evaluated on squares."""
    if record.resize != "square":
        return None
    data = run_config.get("data") if run_config is not None else None
    return square_side(data if isinstance(data, Mapping) else {})


def inference_ready(detector: Detector) -> Detector:
    """Eval mode, no gradients, and the last decoder layer's outputs only (the auxiliary ones train)."""
    detector.aux_loss = False
    return detector.eval().requires_grad_(False)
