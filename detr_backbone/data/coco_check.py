"""Every problem of a COCO folder at once, before a long run meets them one at a time.

Checked: the annotation file's ids (duplicate image, annotation and category ids; annotations of
undeclared images or categories), its entries (image entries without file name or size, boxes that
are not four numbers, have no area, or lie outside their image), and every image file, decoded
whole: missing, unreadable or truncated, or of another size than the JSON says (a rotated or
re-encoded file, whose boxes would be wrong; a photo whose EXIF orientation turns it to the JSON's
size is named as such). ``detr-backbone verify`` prints them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Optional, TypeVar

from .coco import read_instances
from .images import TURNED, BadImageError, as_rgb, exif_orientation, open_image

Item = TypeVar("Item")

EDGE_TOLERANCE = 1.0  # pixels a box may reach past the image: COCO's own boxes do, by rounding


@dataclass(frozen=True)
class Problem:
    where: str  # an image file, or the annotation file
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass(frozen=True)
class FolderReport:
    images: int
    annotations: int
    categories: int
    problems: list[Problem]


def duplicates(entries: Iterable[Mapping[str, Any]]) -> list[Any]:
    counts = Counter(entry.get("id") for entry in entries)
    return sorted((key for key, count in counts.items() if count > 1), key=str)


def id_problems(source: str, entries: Mapping[str, list[Mapping[str, Any]]]) -> list[Problem]:
    problems = []
    for group in ("images", "annotations", "categories"):
        for duplicate in duplicates(entries[group]):
            problems.append(Problem(source, f"{group[:-1]} id {duplicate} is declared more than once"))
    return problems


def size_of(image: Mapping[str, Any]) -> Optional[tuple[float, float]]:
    width, height = image.get("width"), image.get("height")
    return (width, height) if isinstance(width, Real) and isinstance(height, Real) else None


def box_problem(bbox: Any, size: Optional[tuple[float, float]]) -> Optional[str]:
    """What is wrong with a COCO ``[x, y, width, height]`` box in an image of ``size``, if anything."""
    if not isinstance(bbox, Sequence) or len(bbox) != 4 or not all(isinstance(v, Real) for v in bbox):
        return f"bbox {bbox!r} is not four numbers [x, y, width, height]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"box {list(bbox)} has no area"
    if size is None:
        return None
    width, height = size
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return f"box {list(bbox)} lies outside the {width}x{height} image"
    overflow = max(-x, -y, x + w - width, y + h - height)
    if overflow > EDGE_TOLERANCE:
        return f"box {list(bbox)} reaches {overflow:g} px past the {width}x{height} image"
    return None


def annotation_problems(source: str, entries: Mapping[str, list[Mapping[str, Any]]]) -> list[Problem]:
    images = {image.get("id"): image for image in entries["images"]}
    categories = {category.get("id") for category in entries["categories"]}
    problems = []
    for annotation in entries["annotations"]:
        image = images.get(annotation.get("image_id"))
        named = f"annotation {annotation.get('id')}" + (f" ({image.get('file_name')})" if image else "")
        if image is None:
            problems.append(
                Problem(source, f"{named} is of image id {annotation.get('image_id')!r}, which is not declared")
            )
        if annotation.get("category_id") not in categories:
            problems.append(
                Problem(source, f"{named} has category id {annotation.get('category_id')!r}, which is not declared")
            )
        issue = box_problem(annotation.get("bbox"), None if image is None else size_of(image))
        if issue:
            problems.append(Problem(source, f"{named}: {issue}"))
    return problems


def decoded(path: Path) -> tuple[tuple[int, int], int] | Problem:
    """The stored (width, height) and EXIF orientation of the image at ``path``, decoded whole; or its problem."""
    try:
        with open_image(path) as opened:
            orientation, picture = exif_orientation(opened), as_rgb(opened)
    except BadImageError as error:
        reason = (
            "missing"
            if isinstance(error, FileNotFoundError)
            else "cannot be read: " + str(error).split(f"{path}: ", 1)[-1]
        )
        return Problem(str(path), reason)
    return (picture.width, picture.height), orientation


def size_problems(
    path: Path, stored: tuple[int, int], orientation: int, declared: tuple[float, float], says: str
) -> list[Problem]:
    """The image's stored size against the ``declared`` (width, height) its annotation (``says``: "the JSON") gives."""
    if declared == stored:
        return []
    if declared == stored[::-1] and orientation in TURNED:
        return [
            Problem(
                str(path),
                f"is stored {stored[0]}x{stored[1]}, and its EXIF orientation {orientation} turns it to "
                f"the {declared[0]}x{declared[1]} {says} says, as viewers show it: its boxes were likely drawn "
                "on the turned image, but training reads the stored pixels; save it upright "
                f"(PIL.ImageOps.exif_transpose) and keep {says}",
            )
        ]
    turned = " (rotated?)" if declared == stored[::-1] else ""
    return [
        Problem(
            str(path),
            f"is {stored[0]}x{stored[1]} pixels, {says} says {declared[0]}x{declared[1]}{turned}; its boxes would be wrong",
        )
    ]


def image_problems(image_dir: Path, source: str, image: Mapping[str, Any]) -> list[Problem]:
    """The image entry's own problems, then its file's: missing, unreadable, or not of the declared size."""
    if not isinstance(image.get("file_name"), str):
        return [Problem(source, f"image {image.get('id')} has no file_name")]
    path = image_dir / image["file_name"]
    found = decoded(path)
    if isinstance(found, Problem):
        return [found]
    declared = size_of(image)
    if declared is None:
        return [Problem(source, f"image {image.get('id')} ({image['file_name']}) has no numeric width and height")]
    return size_problems(path, *found, declared, "the JSON")


def in_threads(check: Callable[[Item], list[Problem]], items: Iterable[Item], workers: int) -> list[Problem]:
    """``check``'s problems of every item, in order, run by ``workers`` threads (PIL decodes without the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [problem for found in pool.map(check, items) for problem in found]


def check_coco_folder(image_dir: str | Path, annotation_file: str | Path, workers: int = 8) -> FolderReport:
    """Every problem of the folder; the images are decoded by ``workers`` threads (PIL decodes without the GIL)."""
    image_dir, annotation_file = Path(image_dir), Path(annotation_file)
    source = str(annotation_file)
    try:
        dataset = read_instances(annotation_file)
    except (ValueError, OSError) as error:
        return FolderReport(0, 0, 0, [Problem(source, str(error).removeprefix(f"{annotation_file} "))])
    entries, problems = {}, []
    for group in ("images", "annotations", "categories"):
        listed = dataset.get(group, [])
        entries[group] = [entry for entry in listed if isinstance(entry, Mapping)] if isinstance(listed, list) else []
        if len(entries[group]) != (len(listed) if isinstance(listed, list) else 1):
            problems.append(Problem(source, f"'{group}' holds entries that are not objects"))
    problems += id_problems(source, entries) + annotation_problems(source, entries)
    problems += in_threads(lambda image: image_problems(image_dir, source, image), entries["images"], workers)
    return FolderReport(*(len(entries[group]) for group in ("images", "annotations", "categories")), problems)
