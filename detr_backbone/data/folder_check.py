"""Every problem of a YOLO or Pascal VOC folder at once, in the terms of ``coco_check``: each bad label
line by file and line (a class outside the names, a coordinate outside [0, 1] or a box outside its
image, a box of no area, a malformed line), each image missing or unreadable (decoded whole, in
threads), each YOLO label file without its image and each VOC image of another size than its XML says."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .coco_check import FolderReport, Problem, decoded, in_threads, size_problems
from .voc import VocAnnotation, image_file, object_problem, read_annotation, split_ids, voc_class_names
from .yolo import YoloLayout, label_path, read_labels, read_layout


def image_file_problems(path: Path) -> list[Problem]:
    found = decoded(path)
    return [found] if isinstance(found, Problem) else []


def orphan_labels(layout: YoloLayout, split: str, expected: set[Path]) -> list[Problem]:
    """The label files under a split's labels folder that no image of the split reads."""
    written = layout.splits[split]
    problems = []
    for entry in [written] if isinstance(written, str) else written:
        folder = layout.resolve(str(entry))
        if not folder.is_dir():
            continue  # a .txt list of images: no folder of its own to search
        labels = label_path(folder / "image.png").parent
        for orphan in sorted(set(labels.rglob("*.txt")) - expected):
            problems.append(Problem(str(orphan), f"a label file without its image (none of that name in {folder})"))
    return problems


def check_yolo_folder(root: str | Path, splits: Sequence[str], workers: int = 8) -> FolderReport:
    """Every problem of the splits of the YOLO folder ``root``."""
    try:
        layout = read_layout(root)
    except ValueError as error:
        return FolderReport(0, 0, 0, [Problem(str(root), str(error))])
    images, boxes, problems = [], 0, []
    for split in dict.fromkeys(splits):
        try:
            listed = layout.images(split)
        except ValueError as error:
            problems.append(Problem(str(layout.data_file), str(error).removeprefix(f"{layout.data_file}: ")))
            continue
        for image in listed:
            labels = label_path(image)
            _, _, lines, bad = read_labels(labels, layout.class_ids)
            boxes += len(lines) + len(bad)
            problems += [Problem(f"{labels}:{box.line}", box.what) for box in bad]
        problems += orphan_labels(layout, split, {label_path(image) for image in listed})
        images += listed
    problems += in_threads(image_file_problems, images, workers)
    return FolderReport(len(images), boxes, len(layout.names), problems)


def check_voc_folder(
    root: str | Path, splits: Sequence[str], classes: Sequence[str] | None = None, workers: int = 8
) -> FolderReport:
    """Every problem of the splits of the Pascal VOC folder ``root``; difficult objects are checked too."""
    root = Path(root)
    names = list(classes) if classes is not None else voc_class_names(root.resolve())
    annotations, problems = [], []
    for split in dict.fromkeys(splits):
        try:
            ids = split_ids(root, split)
        except ValueError as error:
            problems.append(Problem(str(root), str(error)))
            continue
        for image_id in ids:
            annotation = read_annotation(root / "Annotations" / f"{image_id}.xml")
            if annotation.error is not None:
                problems.append(Problem(str(annotation.path), annotation.error))
                continue
            if annotation.size is None:
                problems.append(Problem(str(annotation.path), "has no numeric size/width and size/height"))
            for item in annotation.objects:
                problem = object_problem(item, names, annotation.size)
                if problem is not None:
                    problems.append(Problem(f"{annotation.path}:{item.line}", problem))
            annotations.append((image_file(root, image_id, annotation), annotation))

    def image_problems(entry: tuple[Path, VocAnnotation]) -> list[Problem]:
        path, annotation = entry
        found = decoded(path)
        if isinstance(found, Problem):
            return [found]
        return [] if annotation.size is None else size_problems(path, *found, annotation.size, "its XML")

    problems += in_threads(image_problems, annotations, workers)
    objects = sum(len(annotation.objects) for _, annotation in annotations)
    return FolderReport(len(annotations), objects, len(names), problems)
