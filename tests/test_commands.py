"""predict and evaluate on a checkpoint trained here, and what every command does with bad input."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from detr_backbone.__main__ import main as dispatch
from detr_backbone.commands.evaluate import main as evaluate_main
from detr_backbone.commands.export import main as export_main
from detr_backbone.commands.predict import main as predict_main
from detr_backbone.data import ShapesDataset
from detr_backbone.inference import Predictor

from .tiny_checkpoint import CLASS_NAMES, NUM_QUERIES

pytestmark = pytest.mark.usefixtures("one_thread")

COCO_STATS = [
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
]
# category ids as a COCO file may have them: sparse, and in another order than the checkpoint's classes
COCO_CATEGORIES = {3: "rectangle", 11: "ellipse", 7: "triangle"}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint  # trained once a session (tests/conftest.py)


def shapes(count: int, split: str = "val", min_size: int = 40, max_size: int = 64) -> list:
    dataset = ShapesDataset(count, min_size=min_size, max_size=max_size, split=split)
    return [dataset.render(index) for index in range(count)]


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory) -> tuple[Path, Path]:
    """Five shapes images as PNG files and their COCO instances file (ids from 100, one crowd region)."""
    folder = tmp_path_factory.mktemp("coco")
    (folder / "images").mkdir()
    ids = {name: cat_id for cat_id, name in COCO_CATEGORIES.items()}
    images, annotations = [], []
    for index, (image, target) in enumerate(shapes(5)):
        image.save(folder / "images" / f"{index:03d}.png")
        images.append(
            {"id": 100 + index, "file_name": f"{index:03d}.png", "height": image.height, "width": image.width}
        )
        boxes = box_convert(target["boxes"].as_subclass(torch.Tensor), "xyxy", "xywh").tolist()
        for box, label in zip(boxes, target["labels"].tolist()):
            annotations.append(annotation(len(annotations) + 1, 100 + index, ids[CLASS_NAMES[label]], box))
    annotations.append({**annotation(len(annotations) + 1, 100, 3, [0, 0, 8, 8]), "iscrowd": 1})
    categories = [{"id": cat_id, "name": name} for cat_id, name in COCO_CATEGORIES.items()]
    (folder / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return folder / "images", folder / "instances.json"


def annotation(number: int, image_id: int, category_id: int, box: list[float]) -> dict:
    return {
        "id": number,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": box,
        "area": box[2] * box[3],
        "iscrowd": 0,
    }


def photos(folder: Path) -> dict[str, Image.Image]:
    """Three readable images of different sizes (PNG and JPEG), a corrupt JPEG and a text file."""
    folder.mkdir()
    written = {}
    for name, (image, _) in zip(("a.png", "b.png", "c.jpg"), shapes(3, "test")):
        image.save(folder / name)
        written[name] = Image.open(folder / name).convert("RGB")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return written


def cocoeval(ground_truth: Path, detections: Path) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(ground_truth))
        evaluation = COCOeval(truth, truth.loadRes(str(detections)), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def class_ap(evaluation: COCOeval, index: int, thresholds: slice = slice(None)) -> float | None:
    precision = evaluation.eval["precision"][thresholds, :, index, 0, 2]  # area all, 100 detections
    return float(np.mean(precision[precision > -1])) if (precision > -1).any() else None


# --- predict ------------------------------------------------------------------------------------


def test_predict_writes_every_readable_image_and_names_the_corrupt_one(checkpoint, tmp_path, capsys):
    originals = photos(tmp_path / "photos")
    out = tmp_path / "out"
    arguments = [f"ckpt_path={checkpoint}", f"input={tmp_path / 'photos'}", f"output_dir={out}", "progress=false"]
    summary = predict_main([*arguments, "threshold=0", "top_k=3"])
    assert summary.images == 3 and [file.name for file, _ in summary.skipped] == ["broken.jpg"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.jpg", "detections.json"]
    captured = capsys.readouterr()
    assert "skipped 1 unreadable image: " in captured.out and captured.out.rstrip().endswith("broken.jpg")
    assert "skipped: cannot read image" in captured.err and "broken.jpg" in captured.err
    rows = json.loads((out / "detections.json").read_text())
    assert sorted({row["file_name"] for row in rows}) == ["a.png", "b.png", "c.jpg"] and len(rows) == 3 * 3
    # the command's batch: the three readable images together, padded to the largest (batch_size 4)
    expected_all = Predictor.from_checkpoint(checkpoint, threshold=0.0, top_k=3, batch_size=4)(list(originals.values()))
    for (name, original), expected in zip(originals.items(), expected_all):
        with Image.open(out / name) as drawn:
            assert drawn.size == original.size
            if name.endswith(".png"):  # lossless: the boxes changed pixels, the rest is the original
                changed = (np.asarray(drawn.convert("RGB")) != np.asarray(original)).any(2)
                assert 0 < changed.mean() < 0.9
        mine = [row for row in rows if row["file_name"] == name]
        boxes = box_convert(expected.boxes, "xyxy", "xywh")
        assert [row["label"] for row in mine] == expected.names
        assert [row["category_id"] for row in mine] == [label + 1 for label in expected.labels.tolist()]
        assert all(row["image_id"] is None for row in mine)
        np.testing.assert_allclose([row["bbox"] for row in mine], boxes.numpy(), atol=0.006)
        np.testing.assert_allclose([row["score"] for row in mine], expected.scores.numpy(), atol=6e-6)


def sideways(upright: Image.Image, path: Path) -> Path:
    """``upright`` stored a quarter turned, with the EXIF orientation (6) that turns it back for viewers."""
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    return path


def test_predict_and_the_predictor_read_photos_as_viewers_show_them(checkpoint, tmp_path):
    upright = Image.fromarray(np.random.default_rng(3).integers(0, 256, (56, 40, 3), dtype=np.uint8))
    upright.save(tmp_path / "upright.png")
    stored = sideways(upright, tmp_path / "phone.png")
    with Image.open(stored) as raw:
        assert raw.size == (56, 40)  # stored sideways: 56 wide
    predictor = Predictor.from_checkpoint(checkpoint, threshold=0.0, top_k=3)
    turned, expected = predictor([stored, tmp_path / "upright.png"])
    assert torch.equal(turned.boxes, expected.boxes) and torch.equal(turned.scores, expected.scores)
    assert (turned.boxes[:, 2] <= 40 + 1e-4).all() and (turned.boxes[:, 3] <= 56 + 1e-4).all()
    with Image.open(stored) as opened:  # a PIL image the user opened: turned too
        assert torch.equal(predictor([opened])[0].boxes, expected.boxes)
    predict_main([f"ckpt_path={checkpoint}", f"input={stored}", f"output_dir={tmp_path / 'out'}", "progress=false"])
    with Image.open(tmp_path / "out" / "phone.png") as drawn:
        assert drawn.size == (40, 56)  # drawn upright


def test_predict_stops_at_an_unreadable_image_when_told(checkpoint, tmp_path):
    photos(tmp_path / "photos")
    out = tmp_path / "out"
    arguments = [f"ckpt_path={checkpoint}", f"input={tmp_path / 'photos'}", f"output_dir={out}", "progress=false"]
    with pytest.raises(
        SystemExit, match=r"^error: cannot read image \S*broken\.jpg: .* \(on_error=skip would skip it and go on\)$"
    ):
        predict_main([*arguments, "on_error=stop"])
    assert not out.exists()


def test_predict_names_an_image_over_the_decompression_bomb_limit(checkpoint, tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    for name, side in (("small.png", 40), ("huge.png", 64)):
        Image.fromarray(np.full((side, side, 3), 90, dtype=np.uint8)).save(tmp_path / "in" / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1800)  # PIL refuses over twice the limit: 64 x 64 = 4096 > 3600
    summary = predict_main(
        [f"ckpt_path={checkpoint}", f"input={tmp_path / 'in'}", f"output_dir={tmp_path / 'out'}", "progress=false"]
    )
    assert summary.images == 1 and [file.name for file, _ in summary.skipped] == ["huge.png"]
    assert "decompression-bomb limit" in summary.skipped[0][1] and "4096 pixels" in summary.skipped[0][1]


def test_predict_reads_image_and_category_ids_from_annotations(checkpoint, coco_folder, tmp_path):
    images, annotations = coco_folder
    predict_main(
        [
            f"ckpt_path={checkpoint}",
            f"input={images}/00*.png",
            f"annotations={annotations}",
            f"output_dir={tmp_path}",
            "threshold=0",
            "draw=false",
            "progress=false",
        ]
    )
    rows = json.loads((tmp_path / "detections.json").read_text())
    assert {(row["file_name"], row["image_id"]) for row in rows} == {
        (f"00{index}.png", 100 + index) for index in range(5)
    }
    assert all(COCO_CATEGORIES[row["category_id"]] == row["label"] for row in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detections.json"]


# --- evaluate -----------------------------------------------------------------------------------


def test_evaluate_on_a_coco_folder_equals_cocoeval_of_the_written_files(checkpoint, coco_folder, tmp_path, capsys):
    images, annotations = coco_folder
    evaluate_main(
        [
            f"ckpt_path={checkpoint}",
            "data=coco",
            f"data.val_images={images}",
            f"data.val_annotations={annotations}",
            "data.val_resize=48",
            "data.max_resize=80",
            "data.num_workers=0",
            "data.persistent_workers=false",
            "data.pin_memory=false",
            f"output_dir={tmp_path}",
            "progress=false",
        ]
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    reference = cocoeval(annotations, tmp_path / "detections.json")
    assert saved["summary"] == dict(zip(COCO_STATS, reference.stats.tolist()))
    assert max(saved["summary"].values()) > 0  # not a comparison of zeros
    names = dict(COCO_CATEGORIES)
    expected = {
        names[cat_id]: {"AP": class_ap(reference, index), "AP50": class_ap(reference, index, slice(0, 1))}
        for index, cat_id in enumerate(reference.params.catIds)
    }
    assert saved["per_class"] == expected and saved["images"] == 5
    rows = json.loads((tmp_path / "detections.json").read_text())
    assert len(rows) == 5 * NUM_QUERIES and saved["detections"] == len(rows)
    assert all(COCO_CATEGORIES[row["category_id"]] == row["label"] for row in rows)
    assert {row["file_name"] for row in rows} == {f"{index:03d}.png" for index in range(5)}
    printed = capsys.readouterr().out
    assert f"= {reference.stats[0]:0.3f}" in printed and "triangle" in printed
    assert not (tmp_path / "ground_truth.json").exists()  # the folder's own annotations are the ground truth


def test_evaluate_the_shapes_data_writes_their_ground_truth(checkpoint, tmp_path):
    data = ["data.val_size=4", "data.min_size=40", "data.max_size=56"]
    evaluate_main([f"ckpt_path={checkpoint}", *data, f"output_dir={tmp_path}", "progress=false"])
    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    assert truth["categories"] == [
        {"id": 1, "name": "rectangle"},
        {"id": 2, "name": "ellipse"},
        {"id": 3, "name": "triangle"},
    ]
    samples = shapes(4, min_size=40, max_size=56)
    sizes = [(index, image.height, image.width) for index, (image, _) in enumerate(samples)]
    assert [(entry["id"], entry["height"], entry["width"]) for entry in truth["images"]] == sizes
    boxes = [box_convert(t["boxes"].as_subclass(torch.Tensor), "xyxy", "xywh").tolist() for _, t in samples]
    assert [a["bbox"] for a in truth["annotations"]] == [box for image in boxes for box in image]
    assert [a["category_id"] for a in truth["annotations"]] == [
        label + 1 for _, t in samples for label in t["labels"].tolist()
    ]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    reference = cocoeval(tmp_path / "ground_truth.json", tmp_path / "detections.json")
    assert saved["summary"] == dict(zip(COCO_STATS, reference.stats.tolist()))


def test_evaluate_scores_a_checkpoint_on_its_runs_own_validation_set(checkpoint, tmp_path, capsys):
    metrics = evaluate_main([f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'own'}", "progress=false"])
    assert metrics.images == 2  # the run's data.val_size, not the 200 of the package's shapes config
    saved = json.loads((tmp_path / "own" / "metrics.json").read_text())["data"]
    assert (saved["val_size"], saved["min_size"], saved["max_size"]) == (2, 32, 48)
    assert f"{checkpoint} on the data=shapes validation set (the run's own): 2 images" in capsys.readouterr().out
    given = ["data.val_size=3", "data.min_size=40", "data.max_size=48", "progress=false"]
    metrics = evaluate_main([f"ckpt_path={checkpoint}", *given, f"output_dir={tmp_path / 'given'}"])
    assert metrics.images == 3  # data overrides choose the data


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, arguments, message",
    [
        (
            predict_main,
            ["ckpt_path={tmp}/missing.ckpt", "input={tmp}/in"],
            r"checkpoint file not found: \S+missing\.ckpt",
        ),
        (
            predict_main,
            ["ckpt_path={tmp}/in/junk.ckpt", "input={tmp}/in"],
            r"\S+junk\.ckpt is not a train\.py checkpoint, a DETR checkpoint, a Hugging Face DETR folder or weights file, "
            r"a Deformable-DETR checkpoint, a Hugging Face Deformable DETR folder or weights file, a DINO checkpoint, "
            r"an RT-DETRv2 checkpoint, a Hugging Face RT-DETRv2 folder or weights file, a Hugging Face RT-DETR "
            r"folder or weights file, a D-FINE checkpoint or a Hugging Face D-FINE folder or weights file \(.*\)",
        ),
        (
            predict_main,
            ["ckpt_path={ckpt}", "input={tmp}/empty"],
            r"input='\S+empty': the folder holds no image files \(0 other files\)",
        ),
        (
            predict_main,
            ["ckpt_path={ckpt}", "input={tmp}/in/*.jpg"],
            r"input='\S+\*\.jpg': the glob holds no image files \(0 other files\)",
        ),
        (
            predict_main,
            ["ckpt_path={ckpt}", "input={tmp}/in", "output_dir={tmp}/in/a.png"],
            r"output_dir='\S+a\.png' is a file, not a folder",
        ),
        (
            predict_main,
            ["ckpt_path={ckpt}", "input={tmp}/in", "output_dir={tmp}/in"],
            r"output_dir='\S+in' would overwrite the input images .*",
        ),
        (
            predict_main,
            ["ckpt_path={ckpt}", "input={tmp}/in", "fuse=true", "compile=true"],
            r"fuse=true and compile=true exclude each other: inductor fuses on its own",
        ),
        (evaluate_main, ["ckpt_path={tmp}/missing.ckpt"], r"checkpoint file not found: \S+missing\.ckpt"),
        (
            evaluate_main,
            ["ckpt_path={ckpt}", "output_dir={tmp}/in/a.png"],
            r"output_dir='\S+a\.png' is a file, not a folder",
        ),
        (
            evaluate_main,
            ["ckpt_path={ckpt}", "fuse=true", "dtype=float16", "output_dir={tmp}/out"],
            r"fuse=True needs oneDNN on a CPU in float32 or bfloat16, uncompiled; got cpu / torch\.float16",
        ),
        (
            export_main,
            ["ckpt_path={ckpt}", "output={tmp}/out"],
            r"output='\S+out' is a folder; give the file to write, e.g. \S+model\.onnx",
        ),
        (
            export_main,
            ["ckpt_path={ckpt}", "format=tflite", "output={tmp}/out/model.tflite"],
            r"format='tflite' is not supported; choose one of onnx, torch_export",
        ),
        (
            export_main,
            ["ckpt_path={tmp}/in/junk.ckpt", "output={tmp}/out/model.onnx"],
            r"\S+junk\.ckpt is not a train\.py checkpoint.*",
        ),
    ],
    ids=[
        "missing-ckpt",
        "not-a-ckpt",
        "empty-folder",
        "empty-glob",
        "output-dir-is-a-file",
        "output-dir-is-the-input",
        "fuse-and-compile",
        "evaluate-missing-ckpt",
        "evaluate-output-dir-is-a-file",
        "evaluate-fuse-float16",
        "export-output-is-a-folder",
        "export-format",
        "export-not-a-ckpt",
    ],
)
def test_bad_input_fails_in_one_line_and_writes_nothing(checkpoint, tmp_path, command, arguments, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "junk.ckpt").write_bytes(b"junk")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stopped:
        quiet = [] if command is export_main else ["progress=false"]
        command([argument.format(tmp=tmp_path, ckpt=checkpoint) for argument in arguments] + quiet)
    assert isinstance(stopped.value.code, str) and "\n" not in stopped.value.code  # a message: exit status 1
    assert re.fullmatch("error: " + message, stopped.value.code), stopped.value.code
    assert sorted(tmp_path.rglob("*")) == before


def test_the_dispatcher_lists_and_runs_the_commands(tmp_path, capsys):
    dispatch(["--help"])
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in ("predict", "evaluate", "export", "render"))
    with pytest.raises(SystemExit) as stopped:  # a str code: Python prints it and exits with status 1
        dispatch(["export", f"ckpt_path={tmp_path / 'none.ckpt'}"])
    assert stopped.value.code == f"error: checkpoint file not found: {tmp_path / 'none.ckpt'}"
    with pytest.raises(SystemExit) as stopped:
        dispatch(["predict", "--help"])
    assert stopped.value.code == 0 and "threshold: 0.5" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
