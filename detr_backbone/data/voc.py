"""A folder in Pascal VOC's layout: ``Annotations/<id>.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``.

A split file lists image ids, one a line. Each id's XML gives the image's ``filename`` (``<id>.jpg``
without one), its ``size`` and its ``object``s: ``name``, ``difficult`` and ``bndbox``
(``xmin ymin xmax ymax``, 1-based pixels, both ends included). Boxes follow detectron2's convention,
``x0 = xmin - 1, y0 = ymin - 1, x1 = xmax, y1 = ymax``. Class names are those of the XMLs, sorted,
unless ``classes`` gives them (in label order).
"""

from __future__ import annotations

import functools
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

import torch
from torch import Tensor

from .folder import BadBox, DegenerateBoxWarning, LabelledFolder, LabelledImage, warn_of_bad_boxes
from .transforms import SampleTransform, Target

DIFFICULT_ACTIONS = ("drop", "keep")  # VOC's own evaluation leaves difficult objects out
CORNERS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class VocObject:
    line: int
    name: str
    difficult: bool
    box: list[float] | None  # x0, y0, x1, y1 in detectron2's convention; None where bndbox is malformed


@dataclass
class VocAnnotation:
    path: Path
    filename: str | None
    size: tuple[int, int] | None  # width, height as the XML says
    objects: list[VocObject] = field(default_factory=list)
    error: str | None = None  # the file is missing or not XML


def parse_with_lines(path: Path) -> tuple[ET.Element, dict[int, int]]:
    """The XML tree of ``path`` and the line of each element's start tag (by ``id``): the standard library's
    expat parser feeding ElementTree's builder."""
    builder, lines = ET.TreeBuilder(), {}
    parser = expat.ParserCreate()

    def start(tag: str, attributes: dict[str, str]) -> None:
        lines[id(builder.start(tag, attributes))] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.Parse(path.read_bytes(), True)
    return builder.close(), lines


def _number(element: ET.Element | None, tag: str) -> float:
    return float((element.findtext(tag) or "").strip()) if element is not None else float("nan")


def read_annotation(path: Path) -> VocAnnotation:
    """The objects of one annotation file; a missing or malformed file is an annotation with ``error``."""
    try:
        root, lines = parse_with_lines(path)
    except FileNotFoundError:
        return VocAnnotation(path, None, None, error="annotation file not found")
    except expat.ExpatError as error:
        return VocAnnotation(path, None, None, error=f"not valid XML: {error}")
    try:
        size = int(_number(root.find("size"), "width")), int(_number(root.find("size"), "height"))
    except ValueError:
        size = None
    annotation = VocAnnotation(path, (root.findtext("filename") or "").strip() or None, size)
    for element in root.iter("object"):
        try:
            xmin, ymin, xmax, ymax = (_number(element.find("bndbox"), corner) for corner in CORNERS)
            box = (
                None if any(value != value for value in (xmin, ymin, xmax, ymax)) else [xmin - 1, ymin - 1, xmax, ymax]
            )
        except ValueError:
            box = None
        difficult = (element.findtext("difficult") or "0").strip() not in ("0", "")
        name = (element.findtext("name") or "").strip()
        annotation.objects.append(VocObject(lines[id(element)], name, difficult, box))
    return annotation


def object_problem(item: VocObject, names: Sequence[str], size: tuple[int, int] | None) -> str | None:
    """What is wrong with one object, if anything."""
    if item.box is None:
        return f"object {item.name!r}: bndbox is not four numbers {', '.join(CORNERS)}"
    if item.name not in names:
        return f"object {item.name!r} is not one of the classes {', '.join(names)}"
    x0, y0, x1, y1 = item.box
    shown = f"bndbox ({x0 + 1:g}, {y0 + 1:g}, {x1:g}, {y1:g})"
    if x1 <= x0 or y1 <= y0:
        return f"object {item.name!r}: {shown} has no area"
    if size is not None and (x0 < 0 or y0 < 0 or x1 > size[0] or y1 > size[1]):
        return f"object {item.name!r}: {shown} lies outside the {size[0]}x{size[1]} image"
    return None


def split_ids(root: Path, split: str) -> list[str]:
    listed = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listed.is_file():
        raise ValueError(f"data.root={str(root)!r} has no {listed.relative_to(root)} (the ids of split {split!r})")
    return [line.split()[0] for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()]


@functools.cache
def voc_class_names(root: Path) -> list[str]:
    """The sorted names of every object in the folder's Annotations/ (each split's labels alike)."""
    names = {item.name for path in (root / "Annotations").glob("*.xml") for item in read_annotation(path).objects}
    return sorted(name for name in names if name)


def image_file(root: Path, image_id: str, annotation: VocAnnotation) -> Path:
    return root / "JPEGImages" / (annotation.filename or f"{image_id}.jpg")


class VocDetection(LabelledFolder):
    """One split of a Pascal VOC folder. ``difficult="drop"`` leaves difficult objects out, as VOC's own
    evaluation does; ``keep`` trains on them. Each bad object (no area, outside the image its XML
    describes, of a class not in ``classes``, a malformed bndbox) is dropped with a ``DegenerateBoxWarning``
    naming its file and line (``dropped_boxes`` counts them); so is a missing or malformed XML's image,
    read as an image without objects."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        classes: Sequence[str] | None = None,
        difficult: str = "drop",
        transforms: SampleTransform | None = None,
        bad_samples: str = "error",
    ) -> None:
        if difficult not in DIFFICULT_ACTIONS:
            raise ValueError(f"data.difficult={difficult!r} is not one of {', '.join(DIFFICULT_ACTIONS)}")
        self.root = Path(root)
        names = list(classes) if classes is not None else voc_class_names(self.root.resolve())
        if not names or len(set(names)) < len(names):
            raise ValueError(f"the classes of {self.root} must be at least one, each once; got {names}")
        label_of = {name: label for label, name in enumerate(names)}
        entries, self.dropped_boxes = [], 0
        for image_id in split_ids(self.root, split):
            annotation = read_annotation(self.root / "Annotations" / f"{image_id}.xml")
            if annotation.error is not None:
                message = f"{annotation.path}: {annotation.error}; its image is read as one without objects"
                warnings.warn(message, DegenerateBoxWarning, stacklevel=2)
            kept = [item for item in annotation.objects if difficult == "keep" or not item.difficult]
            bad, good = [], []
            for item in kept:
                problem = object_problem(item, names, annotation.size)
                (good if problem is None else bad).append(item if problem is None else BadBox(item.line, problem))
            warn_of_bad_boxes(annotation.path, bad, len(good))
            self.dropped_boxes += len(bad)
            boxes = torch.tensor([item.box for item in good], dtype=torch.float32).reshape(-1, 4)
            labels = torch.tensor([label_of[item.name] for item in good], dtype=torch.int64)
            entries.append(
                LabelledImage(image_file(self.root, image_id, annotation), boxes, labels, [item.line for item in good])
            )
        super().__init__(entries, names, transforms, bad_samples)

    def absolute_boxes(self, entry: LabelledImage, height: int, width: int) -> Tensor:
        return entry.boxes


def write_voc(folder: Path, splits: Mapping[str, Iterable[tuple[Any, Target]]], class_names: Sequence[str]) -> None:
    """Samples (a PIL image and its raw target, integer XYXY boxes) as a VOC folder, images as PNG;
    ids are ``<split>_<n>``."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for split, samples in splits.items():
        ids = []
        for index, (image, target) in enumerate(samples):
            image_id = f"{split}_{index:06d}"
            image.save(folder / "JPEGImages" / f"{image_id}.png")
            root = ET.Element("annotation")
            ET.SubElement(root, "filename").text = f"{image_id}.png"
            size = ET.SubElement(root, "size")
            for tag, value in zip(("width", "height", "depth"), (image.width, image.height, 3)):
                ET.SubElement(size, tag).text = str(value)
            for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
                item = ET.SubElement(root, "object")
                ET.SubElement(item, "name").text = class_names[label]
                ET.SubElement(item, "difficult").text = "0"
                corners = ET.SubElement(item, "bndbox")
                for tag, value in zip(CORNERS, (box[0] + 1, box[1] + 1, box[2], box[3])):
                    ET.SubElement(corners, tag).text = f"{value:g}"
            ET.indent(root)
            ET.ElementTree(root).write(folder / "Annotations" / f"{image_id}.xml", encoding="utf-8")
            ids.append(image_id)
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
