"""Shapes data with chosen classes (``data.classes``): new kinds, and the default job's images unchanged."""

from __future__ import annotations

import hashlib

import pytest

from detr_backbone.data import SHAPE_KINDS, ShapesDataset, build_datamodule

from .test_data import drawn_kind


def digest(dataset: ShapesDataset) -> str:
    """A fingerprint of every image's size, labels and boxes."""
    hashed = hashlib.sha256()
    for index in range(len(dataset)):
        image, target = dataset.render(index)
        hashed.update(repr((image.size, target["labels"].tolist(), target["boxes"].int().tolist())).encode())
    return hashed.hexdigest()[:16]


@pytest.mark.parametrize(("split", "expected"), [("train", "bd9606f9ea3979ab"), ("val", "71f5a606e254e5c0")])
def test_default_classes_draw_the_images_drawn_before_classes_could_be_chosen(split, expected):
    # fingerprints taken with the code before data.classes existed, at the default job's image sizes
    assert digest(ShapesDataset(100, min_size=48, max_size=64, split=split)) == expected
    explicit = ShapesDataset(100, min_size=48, max_size=64, split=split, classes=["rectangle", "ellipse", "triangle"])
    assert digest(explicit) == expected


def test_new_kinds_have_tight_boxes_and_their_own_fill():
    """Noise-free single shapes on plain backgrounds: the foreground's extent is the box, its fill tells the kind."""
    dataset = ShapesDataset(60, max_objects=1, noise=0.0, seed=11, classes=["star", "cross"])
    assert dataset.class_names == ("star", "cross") and dataset.num_classes == 2
    fill_ratio = {"star": (0.33, 0.44), "cross": (0.42, 0.72)}
    checked = {drawn_kind(dataset, index, fill_ratio) for index in range(len(dataset))} - {None}
    assert checked == {"star", "cross"}


def test_labels_follow_the_order_of_the_chosen_classes():
    dataset = ShapesDataset(40, classes=["triangle", "star", "rectangle"])
    labels = {label for index in range(len(dataset)) for label in dataset.render(index)[1]["labels"].tolist()}
    assert labels == {0, 1, 2} and dataset.class_names == ("triangle", "star", "rectangle")
    datamodule = build_datamodule({"kind": "shapes", "train_size": 4, "val_size": 2, "classes": ["cross", "ellipse"]})
    assert datamodule.num_classes == 2 and list(datamodule.class_names) == ["cross", "ellipse"]
    assert set(SHAPE_KINDS) == {"rectangle", "ellipse", "triangle", "star", "cross"}


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (
            ["rectangle", "hexagon"],
            "data.classes=['rectangle', 'hexagon'] must name each shape at most once, from rectangle, ellipse, triangle, star, cross (unknown: hexagon)",
        ),
        (["star", "star"], "data.classes=['star', 'star'] must name each shape at most once"),
        ([], "data.classes=[] must name each shape at most once"),
    ],
)
def test_bad_classes_fail_in_one_line(classes, message):
    with pytest.raises(ValueError) as error:
        ShapesDataset(4, classes=classes)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_classes_are_refused_for_coco_data():
    values = {"kind": "coco", "train_images": "a", "train_annotations": "b", "val_images": "c", "val_annotations": "d"}
    with pytest.raises(ValueError, match="data.classes applies to data=shapes and data=voc only: a COCO folder's"):
        build_datamodule({**values, "classes": ["car"]})
