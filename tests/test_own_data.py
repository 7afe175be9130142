"""A user's own folder in YOLO's or Pascal VOC's layout: read as the formats define them (checked against
conversions written here from their definitions), bad lines dropped and named, verified line by line,
evaluated against COCO JSON of its own, and the shapes data written out in each layout read back alike."""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from detr_backbone.__main__ import main as run_command
from detr_backbone.commands.evaluate import EvaluateConfig, dataset_categories, ground_truth_file
from detr_backbone.commands.evaluate import main as evaluate_main
from detr_backbone.data import ShapesDataset, build_datamodule
from detr_backbone.data.coco import DegenerateBoxWarning
from detr_backbone.data.shapes import main as shapes_main
from detr_backbone.data.voc import VocDetection
from detr_backbone.data.yolo import YoloDetection
from detr_backbone.training.config import DataConfig
from detr_backbone.training.job import Job, validated

from .jobs import SMALL, compose_config


def png(path: Path, width: int = 40, height: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def yolo_to_xywh(line: str, width: int, height: int) -> list[float]:
    """YOLO's definition: normalised centre and size -> absolute COCO [x, y, w, h]."""
    _, cx, cy, w, h = (float(value) for value in line.split())
    return [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]


def voc_to_xywh(xmin: float, ymin: float, xmax: float, ymax: float) -> list[float]:
    """VOC's 1-based inclusive corners, detectron2's convention: x0 = xmin - 1, x1 = xmax."""
    return [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]


def xywh(target) -> list[list[float]]:
    boxes = target["boxes"].as_subclass(torch.Tensor)
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()


def close(actual: list[list[float]], expected: list[list[float]]) -> bool:
    return len(actual) == len(expected) and torch.allclose(
        torch.tensor(actual).double(), torch.tensor(expected).double(), atol=1e-4
    )


@pytest.fixture
def roboflow(tmp_path) -> Path:
    """A Roboflow export: ``../train/images`` paths, ``valid/``, names as a mapping with a gap in the ids."""
    root = tmp_path / "parts"
    write(root / "data.yaml", "train: ../train/images\nval: ../valid/images\nnc: 2\nnames: {0: bolt, 2: nut}\n")
    png(root / "train" / "images" / "a.png")
    write(root / "train" / "labels" / "a.txt", "2 0.5 0.5 0.5 0.4\n0 0.25 0.3 0.2 0.2\n")
    png(root / "train" / "images" / "b.png")  # no label file: no objects
    png(root / "train" / "images" / "c.png")
    write(root / "train" / "labels" / "c.txt", "")  # empty: no objects
    png(root / "valid" / "images" / "d.png", 60, 20)
    write(root / "valid" / "labels" / "d.txt", "0 0.5 0.5 1 1\n")
    return root


def test_a_roboflow_folder_reads_as_yolo_defines_it(roboflow):
    train = YoloDetection(roboflow, "train")
    assert train.class_names == ["bolt", "nut"] and train.category_ids == [1, 2]  # ids 0 and 2 -> labels 0 and 1
    assert [path.name for path in map(train.image_path, range(len(train)))] == ["a.png", "b.png", "c.png"]
    _, target = train.load(0)
    assert target["labels"].tolist() == [1, 0]
    lines = (roboflow / "train" / "labels" / "a.txt").read_text().splitlines()
    assert close(xywh(target), [yolo_to_xywh(line, 40, 30) for line in lines])
    assert [train.load(index)[1]["boxes"].shape[0] for index in (1, 2)] == [0, 0]
    _, target = YoloDetection(roboflow, "val").load(0)
    assert close(xywh(target), [[0, 0, 60, 20]]) and target["orig_size"].tolist() == [20, 60]


def test_names_as_a_list_a_path_key_and_a_txt_list_of_images(tmp_path):
    root = tmp_path / "set"
    png(root / "images" / "x" / "1.png")
    png(root / "images" / "x" / "2.png")
    write(root / "labels" / "x" / "2.txt", "1 0.5 0.5 0.5 0.5\n")
    write(root / "val.txt", "images/x/2.png\n")
    config = write(tmp_path / "elsewhere" / "set.yaml", f"path: {root}\ntrain: images\nval: val.txt\nnames: [a, b]\n")
    assert len(YoloDetection(config, "train")) == 2
    val = YoloDetection(config, "val")
    assert val.class_names == ["a", "b"] and len(val) == 1
    assert val.load(0)[1]["labels"].tolist() == [1]


def test_each_bad_yolo_line_is_dropped_and_named_by_file_and_line(tmp_path):
    root = tmp_path / "bad"
    write(root / "data.yaml", "train: images\nval: images\nnames: [a, b]\n")
    png(root / "images" / "1.png")
    labels = write(
        root / "labels" / "1.txt",
        "0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n1 1.2 0.5 0.2 0.2\n1 0.5 0.5 0 0.2\n1 0.5 0.5\n\nx 0.5 0.5 0.2 0.2\n",
    )
    with pytest.warns(DegenerateBoxWarning) as caught:
        dataset = YoloDetection(root, "train")
    assert dataset.dropped_boxes == 5
    assert [str(warning.message) for warning in caught] == [
        f"{labels}: dropped 5 of 6 boxes (line 2: class id 5 is not among the names of data.yaml (its ids: 0, 1); "
        "line 3: cx=1.2 outside [0, 1] (coordinates are normalised by the image size); "
        "line 4: box of no area (w=0, h=0.2); line 5: expected 5 values (class cx cy w h), got 3; "
        "line 7: expected an integer class id and four numbers, got 'x 0.5 0.5 0.2 0.2')"
    ]
    assert dataset.load(0)[1]["labels"].tolist() == [0]


def test_verify_names_every_bad_line_of_a_yolo_folder(tmp_path, capsys):
    root = tmp_path / "bad"
    write(root / "data.yaml", "train: train/images\nval: valid/images\nnames: [a, b]\n")
    png(root / "train" / "images" / "1.png")
    labels = write(root / "train" / "labels" / "1.txt", "0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n0 0.5 -0.1 0.2 0.2\n")
    orphan = write(root / "train" / "labels" / "gone.txt", "0 0.5 0.5 0.2 0.2\n")
    broken = root / "valid" / "images" / "2.png"
    write(broken, "not a png")
    write(root / "valid" / "labels" / "2.txt", "1 0.5 0.5 0.2\n1 0.5 0.5 0.0 0.3\n")
    with pytest.raises(SystemExit) as exit_:
        run_command(["verify", "data=yolo", f"data.root={root}", "workers=2"])
    valid = root / "valid" / "labels" / "2.txt"
    assert capsys.readouterr().out.splitlines() == [
        f"{labels}:2: class id 2 is not among the names of data.yaml (its ids: 0, 1)",
        f"{labels}:3: cy=-0.1 outside [0, 1] (coordinates are normalised by the image size)",
        f"{orphan}: a label file without its image (none of that name in {root / 'train' / 'images'})",
        f"{valid}:1: expected 5 values (class cx cy w h), got 4",
        f"{valid}:2: box of no area (w=0, h=0.3)",
        f"{broken}: cannot be read: cannot identify image file '{broken}'",
    ]
    assert exit_.value.code == "6 problems in 2 images, 5 annotations, 2 categories"


VOC_XML = """<annotation>
  <filename>{name}</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
  <object><name>dog</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>
  <object><name>cat</name><difficult>1</difficult>
    <bndbox><xmin>5</xmin><ymin>6</ymin><xmax>15</xmax><ymax>16</ymax></bndbox></object>
  <object><name>cat</name>
    <bndbox><xmin>11.5</xmin><ymin>3</ymin><xmax>20</xmax><ymax>9</ymax></bndbox></object>
</annotation>
"""


def voc_folder(root: Path, objects: str = VOC_XML) -> Path:
    for image_id, split in (("one", "train"), ("two", "val")):
        png(root / "JPEGImages" / f"{image_id}.png")
        write(root / "Annotations" / f"{image_id}.xml", objects.format(name=f"{image_id}.png"))
        write(root / "ImageSets" / "Main" / f"{split}.txt", f"{image_id}\n")
    return root


def test_voc_boxes_difficult_objects_and_class_order(tmp_path):
    root = voc_folder(tmp_path / "voc")
    dataset = VocDetection(root, "train")
    assert dataset.class_names == ["cat", "dog"]  # sorted names of the XMLs
    _, target = dataset.load(0)
    assert target["labels"].tolist() == [1, 0]  # the difficult cat left out
    assert close(xywh(target), [voc_to_xywh(1, 1, 40, 30), voc_to_xywh(11.5, 3, 20, 9)])
    kept = VocDetection(root, "val", classes=["dog", "cat"], difficult="keep")
    _, target = kept.load(0)
    assert kept.class_names == ["dog", "cat"] and target["labels"].tolist() == [0, 1, 1]
    assert close(xywh(target)[1:2], [voc_to_xywh(5, 6, 15, 16)])
    with pytest.raises(ValueError, match=r"^data.difficult='ignore' is not one of drop, keep$"):
        VocDetection(root, "val", difficult="ignore")
    write(root / "ImageSets" / "Main" / "extra.txt", "three\n")
    png(root / "JPEGImages" / "three.jpg")  # no XML: <id>.jpg, without objects
    with pytest.warns(DegenerateBoxWarning) as caught:
        extra = VocDetection(root, "extra")
    assert str(caught[0].message) == (
        f"{root / 'Annotations' / 'three.xml'}: annotation file not found; its image is read as one without objects"
    )
    assert extra.load(0)[1]["boxes"].shape == (0, 4)


def test_bad_voc_objects_are_dropped_and_verified_by_file_and_line(tmp_path, capsys):
    bad = VOC_XML.replace("<xmax>40</xmax>", "<xmax>41</xmax>").replace("<xmin>11.5</xmin>", "<xmin>21</xmin>")
    root = voc_folder(tmp_path / "voc", bad.replace("<name>cat</name><difficult>1", "<name>cow</name><difficult>0"))
    xml = root / "Annotations" / "one.xml"
    with pytest.warns(DegenerateBoxWarning) as caught:
        dataset = VocDetection(root, "train", classes=["cat", "dog"])
    assert dataset.dropped_boxes == 3 and len(dataset.load(0)[1]["boxes"]) == 0
    assert str(caught[0].message) == (
        f"{xml}: dropped 3 of 3 boxes (line 4: object 'dog': bndbox (1, 1, 41, 30) lies outside the 40x30 image; "
        "line 6: object 'cow' is not one of the classes cat, dog; line 8: object 'cat': bndbox (21, 3, 20, 9) has no area)"
    )
    (root / "JPEGImages" / "two.png").unlink()
    with pytest.raises(SystemExit) as exit_:
        run_command(["verify", "data=voc", f"data.root={root}", "data.classes=[cat,dog]"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        f"{xml}:4: object 'dog': bndbox (1, 1, 41, 30) lies outside the 40x30 image",
        f"{xml}:6: object 'cow' is not one of the classes cat, dog",
        f"{xml}:8: object 'cat': bndbox (21, 3, 20, 9) has no area",
    ]
    assert lines[-1] == f"{root / 'JPEGImages' / 'two.png'}: missing"
    assert exit_.value.code == "7 problems in 2 images, 6 annotations, 2 categories"


def test_the_data_keys_of_each_kind_are_checked():
    with pytest.raises(ValueError, match=r"^data.classes applies to data=shapes and data=voc only: a YOLO folder"):
        build_datamodule({"kind": "yolo", "root": "x", "classes": ["a"]})
    with pytest.raises(ValueError, match=r"^data config of kind 'voc' is missing root$"):
        build_datamodule({"kind": "voc"})
    with pytest.raises(ValueError, match=r"holds no data.yaml"):
        build_datamodule({"kind": "yolo", "root": "/nonexistent"}).dataset("train")


LOADER = {"batch_size": 3, "val_resize": 64, "max_resize": 200}


@pytest.fixture(scope="module")
def shapes_folders(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("shapes_folders")
    for layout in ("yolo", "voc"):
        shapes_main([str(folder / layout), "--format", layout, "--train-size", "4", "--val-size", "5", "--seed", "3"])
    return {layout: folder / layout for layout in ("yolo", "voc")}


def test_the_shapes_written_as_yolo_and_voc_read_back_as_the_shapes(shapes_folders):
    options = {"seed": 3, "min_size": 96, "max_size": 128}
    folders = {
        "yolo": build_datamodule({"kind": "yolo", "root": str(shapes_folders["yolo"]), **LOADER}),
        "voc": build_datamodule(
            {
                "kind": "voc",
                "root": str(shapes_folders["voc"]),
                "classes": ["rectangle", "ellipse", "triangle"],
                **LOADER,
            }
        ),
    }
    shapes = build_datamodule({"kind": "shapes", "train_size": 4, "val_size": 5, **options, **LOADER})
    expected = list(shapes.val_dataloader())
    for layout, datamodule in folders.items():
        batches = list(datamodule.val_dataloader())
        assert len(batches) == len(expected) == 2
        for (_, targets), (_, reference) in zip(batches, expected):
            for target, truth in zip(targets, reference, strict=True):
                assert target["labels"].tolist() == truth["labels"].tolist(), layout
                torch.testing.assert_close(target["boxes"], truth["boxes"], rtol=1e-4, atol=0)
        drawn = ShapesDataset(4, split="train", **options)
        for index in range(4):  # lossless PNG: the very pixels
            assert datamodule.dataset("train").load(index)[0].tobytes() == drawn.render(index)[0].tobytes()


def test_the_ground_truth_evaluate_writes_of_a_yolo_and_a_voc_folder(shapes_folders, tmp_path):
    for layout, root in shapes_folders.items():
        classes = {"classes": ["rectangle", "ellipse", "triangle"]} if layout == "voc" else {}
        data = DataConfig(kind=layout, root=str(root), **classes)
        dataset = build_datamodule(data).dataset("val")
        names, ids = dataset_categories(dataset)
        written = ground_truth_file(EvaluateConfig(ckpt_path="unused", data=data), dataset, names, ids, tmp_path)
        assert_same_ground_truth(json.loads(written.read_text()), layout, root)


def assert_same_ground_truth(truth: dict, layout: str, root: Path) -> None:
    """``truth`` is the val split as COCO JSON, converted here from each format's own files (image ids: position
    in the split; category ids 1..K in label order)."""
    if layout == "yolo":
        names = yaml.safe_load((root / "data.yaml").read_text())["names"]
        images = sorted((root / "valid" / "images").iterdir())
        rows = [(path, (root / "valid" / "labels" / f"{path.stem}.txt").read_text().splitlines()) for path in images]
    else:
        names = ["rectangle", "ellipse", "triangle"]
        ids = (root / "ImageSets" / "Main" / "val.txt").read_text().split()
        rows = [(root / "JPEGImages" / f"{image_id}.png", root / "Annotations" / f"{image_id}.xml") for image_id in ids]
    images, annotations = [], []
    for index, (path, labels) in enumerate(rows):
        width, height = Image.open(path).size
        images.append({"id": index, "file_name": str(path), "height": height, "width": width})
        if layout == "yolo":
            objects = [(int(line.split()[0]), yolo_to_xywh(line, width, height)) for line in labels]
        else:
            corners = ("xmin", "ymin", "xmax", "ymax")
            objects = [
                (
                    names.index(item.findtext("name")),
                    voc_to_xywh(*(float(item.findtext(f"bndbox/{c}")) for c in corners)),
                )
                for item in ET.parse(labels).getroot().iter("object")
            ]
        annotations += [(index, label + 1, box) for label, box in objects]
    assert truth["images"] == images
    assert truth["categories"] == [{"id": number, "name": name} for number, name in enumerate(names, start=1)]
    assert [(a["image_id"], a["category_id"]) for a in truth["annotations"]] == [row[:2] for row in annotations]
    assert close([a["bbox"] for a in truth["annotations"]], [row[2] for row in annotations])
    assert len(annotations) > 5  # not a comparison of nothing


@pytest.mark.slow
def test_a_run_on_a_yolo_folder_trains_and_evaluates_its_own_validation_split(shapes_folders, tmp_path, capsys):
    root = shapes_folders["yolo"]
    data = [f"data.root={root}", "data.scales=[48]", "data.max_resize=96", "data.val_resize=48"]
    data += ["data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false", "data.size_divisibility=0"]
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recipe warning of a CPU model on a folder of one's own
        job = Job(validated(compose_config(*SMALL, "data=yolo", *data, "trainer.max_steps=2")), run)
        job.run()
    assert job.trainer.global_step == 2
    metrics = evaluate_main(
        [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"output_dir={tmp_path / 'ev'}", "progress=false"]
    )
    assert metrics.images == 5
    assert "on the data=yolo validation set (the run's own): 5 images" in capsys.readouterr().out
    assert_same_ground_truth(json.loads((tmp_path / "ev" / "ground_truth.json").read_text()), "yolo", root)
