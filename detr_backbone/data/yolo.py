"""A folder in YOLO's layout, as Ultralytics and Roboflow write it.

``data.yaml`` names the classes (``names``: a list, or a mapping of class id -> name) and the splits
(``train``, ``val``: a folder of images, a ``.txt`` list of image paths, or a list of either), relative to
its ``path`` key or, without one, to its own folder. Roboflow writes ``../train/images``; where that does
not exist, the path without its leading ``../`` is read, as Ultralytics does. Each image's labels are
the ``.txt`` of the same name in the sibling ``labels`` folder (the last ``/images/`` of its path
becomes ``/labels/``), one object a line: ``class cx cy w h``, normalised by the image's size. An image
without a label file, or with an empty one, has no objects.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from torchvision.ops import box_convert

from .folder import BadBox, LabelledFolder, LabelledImage, warn_of_bad_boxes
from .images import image_suffixes
from .transforms import SampleTransform, Target

DATA_FILE = "data.yaml"
FIELDS = ("class", "cx", "cy", "w", "h")
DECIMALS = 8  # written label values: a millionth of a pixel on a 100-pixel side, far below what matters


@dataclass(frozen=True)
class YoloLayout:
    data_file: Path
    base: Path  # what split paths are relative to
    class_ids: list[int]  # the ids label files use, sorted; label = position here
    names: list[str]
    splits: dict[str, Any]  # split key -> path(s) as written

    def images(self, split: str) -> list[Path]:
        """The image files of ``split``, sorted, from its folders (searched through) and .txt lists."""
        if self.splits.get(split) is None:
            raise ValueError(
                f"{self.data_file} has no {split!r} split (its splits: {', '.join(self.splits) or 'none'}); "
                "set data.train_split / data.val_split to its keys"
            )
        written = self.splits[split]
        found: list[Path] = []
        for entry in [written] if isinstance(written, str) else written:
            found += listed_images(self.resolve(str(entry)))
        return sorted(found)

    def resolve(self, written: str) -> Path:
        path = self.base / written
        # Roboflow writes ../train/images beside data.yaml; Ultralytics reads train/images then
        if not path.exists() and written.startswith("../") and (self.base / written[3:]).exists():
            path = self.base / written[3:]
        if not path.exists():
            raise ValueError(f"{self.data_file}: the split path {written!r} does not exist (read as {path})")
        return path


def listed_images(path: Path) -> list[Path]:
    """The images under a folder, or those a .txt file lists (one path a line, relative to the file's folder)."""
    if path.is_dir():
        suffixes = image_suffixes()
        return [file for file in path.rglob("*") if file.suffix.lower() in suffixes and file.is_file()]
    lines = path.read_text(encoding="utf-8").splitlines()
    return [path.parent / line.strip() for line in lines if line.strip()]


def read_layout(root: str | Path) -> YoloLayout:
    """The layout ``root/data.yaml`` (or ``root``, a .yaml file) describes, with errors that name the file."""
    data_file = Path(root)
    if data_file.is_dir():
        data_file = data_file / DATA_FILE
    if not data_file.is_file():
        raise ValueError(f"data.root={str(root)!r} holds no {DATA_FILE} (a YOLO folder's classes and splits)")
    try:
        content = yaml.safe_load(data_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{data_file} is not valid YAML: {error}") from None
    if not isinstance(content, Mapping) or "names" not in content:
        raise ValueError(f"{data_file} has no 'names' (the class names: a list, or a mapping of id -> name)")
    names = content["names"]
    if isinstance(names, Mapping):
        if not all(isinstance(key, int) for key in names):
            raise ValueError(f"{data_file}: the keys of 'names' must be integer class ids, got {list(names)}")
        by_id = dict(sorted(names.items()))
    elif isinstance(names, list):
        by_id = dict(enumerate(names))
    else:
        raise ValueError(f"{data_file}: 'names' must be a list or a mapping of id -> name, got {names!r}")
    named = [str(name) for name in by_id.values()]
    if not named or len(set(named)) < len(named):
        raise ValueError(f"{data_file}: 'names' must name at least one class, each once, got {named}")
    base = Path(content.get("path") or ".")
    base = base if base.is_absolute() else data_file.parent / base
    splits = {
        str(key): value
        for key, value in content.items()
        if key not in ("names", "nc", "path") and isinstance(value, (str, list))
    }
    return YoloLayout(data_file, base, list(by_id), named, splits)


def label_path(image: Path) -> Path:
    """The label file of ``image``: the last ``/images/`` of its path becomes ``/labels/``, the suffix ``.txt``."""
    before, images, after = str(image).rpartition(f"{os.sep}images{os.sep}")
    return Path((before + f"{os.sep}labels{os.sep}" + after) if images else str(image)).with_suffix(".txt")


def line_problem(fields: Sequence[str], class_ids: Sequence[int]) -> str | None:
    """What is wrong with the fields of one label line, if anything."""
    if len(fields) != len(FIELDS):
        return f"expected {len(FIELDS)} values ({' '.join(FIELDS)}), got {len(fields)}"
    try:
        class_id, values = int(fields[0]), [float(value) for value in fields[1:]]
    except ValueError:
        return f"expected an integer class id and four numbers, got {' '.join(fields)!r}"
    if class_id not in class_ids:
        return f"class id {class_id} is not among the names of data.yaml (its ids: {', '.join(map(str, class_ids))})"
    outside = [f"{name}={value:g}" for name, value in zip(FIELDS[1:], values) if not 0 <= value <= 1]
    if outside:
        return f"{', '.join(outside)} outside [0, 1] (coordinates are normalised by the image size)"
    if values[2] <= 0 or values[3] <= 0:
        return f"box of no area (w={values[2]:g}, h={values[3]:g})"
    return None


def read_labels(path: Path, class_ids: Sequence[int]) -> tuple[Tensor, Tensor, list[int], list[BadBox]]:
    """(normalised cxcywh boxes, labels, their lines, bad lines) of a label file; no file: no objects."""
    rows, labels, lines, bad = [], [], [], []
    label_of = {class_id: label for label, class_id in enumerate(class_ids)}
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        problem = line_problem(fields, class_ids)
        if problem is not None:
            bad.append(BadBox(number, problem))
            continue
        labels.append(label_of[int(fields[0])])
        rows.append([float(value) for value in fields[1:]])
        lines.append(number)
    boxes = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)
    return boxes, torch.tensor(labels, dtype=torch.int64), lines, bad


class YoloDetection(LabelledFolder):
    """One split of a YOLO folder (``root``: the folder of data.yaml, or the file). Labels are read once,
    here; each bad line is dropped with a ``DegenerateBoxWarning`` naming its file and line
    (``dropped_boxes`` counts them). Labels 0..K-1 follow the class ids in sorted order."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: SampleTransform | None = None,
        bad_samples: str = "error",
    ) -> None:
        self.layout = read_layout(root)
        entries, self.dropped_boxes = [], 0
        for image in self.layout.images(split):
            labels_file = label_path(image)
            boxes, labels, lines, bad = read_labels(labels_file, self.layout.class_ids)
            warn_of_bad_boxes(labels_file, bad, len(lines))
            self.dropped_boxes += len(bad)
            entries.append(LabelledImage(image, boxes, labels, lines))
        super().__init__(entries, self.layout.names, transforms, bad_samples)

    def absolute_boxes(self, entry: LabelledImage, height: int, width: int) -> Tensor:
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        return box_convert(entry.boxes * scale, "cxcywh", "xyxy")


def write_yolo(folder: Path, splits: Mapping[str, Iterable[tuple[Any, Target]]], class_names: Sequence[str]) -> Path:
    """Samples (a PIL image and its raw target) as a YOLO folder: ``<split>/images/<n>.png``,
    ``<split>/labels/<n>.txt`` and ``data.yaml`` (``names`` a list; ``val`` read from ``valid/``, as Roboflow
    names it). Returns data.yaml's path."""
    written = {}
    for split, samples in splits.items():
        folder_name = "valid" if split == "val" else split
        (folder / folder_name / "images").mkdir(parents=True, exist_ok=True)
        (folder / folder_name / "labels").mkdir(parents=True, exist_ok=True)
        for index, (image, target) in enumerate(samples):
            image.save(folder / folder_name / "images" / f"{index:06d}.png")
            height, width = target["orig_size"].tolist()
            scale = torch.tensor([width, height, width, height], dtype=torch.float64)
            boxes = box_convert(target["boxes"].as_subclass(Tensor).double(), "xyxy", "cxcywh") / scale
            lines = [
                f"{label} " + " ".join(f"{value:.{DECIMALS}f}" for value in box)
                for label, box in zip(target["labels"].tolist(), boxes.tolist())
            ]
            text = "".join(line + "\n" for line in lines)
            (folder / folder_name / "labels" / f"{index:06d}.txt").write_text(text, encoding="utf-8")
        written[split] = f"{folder_name}/images"
    data_file = folder / DATA_FILE
    data_file.write_text(yaml.safe_dump({**written, "nc": len(class_names), "names": list(class_names)}))
    return data_file
