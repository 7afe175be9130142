"""Bad data in a long run: images of any mode load as RGB, an unreadable image is skipped (warned once,
counted, bounded) or stops the run by name, and ``verify`` lists every problem of a COCO folder at once."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr_backbone.__main__ import main as run_command
from detr_backbone.data.coco import CocoDetection
from detr_backbone.data.images import UnreadableImageError, load_rgb_image
from detr_backbone.training.callbacks.bad_samples import BadSampleLimitError, BadSampleWarning
from detr_backbone.training.job import Job, validated

from .jobs import SMALL, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH, HEIGHT = 48, 40


def test_every_image_mode_loads_as_8_bit_rgb(tmp_path):
    palette = Image.new("P", (WIDTH, HEIGHT))
    palette.putpalette([200, 30, 10] * 256)
    expected = {
        "grey.png": (Image.new("L", (WIDTH, HEIGHT), 100), (100, 100, 100)),
        "cmyk.jpg": (Image.new("CMYK", (WIDTH, HEIGHT), (0, 255, 255, 0)), (255, 0, 0)),
        "palette.png": (palette, (200, 30, 10)),
        "rgba.png": (Image.new("RGBA", (WIDTH, HEIGHT), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped, colour kept
        "sixteen_bit.png": (Image.fromarray(np.full((HEIGHT, WIDTH), 40000, dtype=np.uint16)), (156, 156, 156)),
    }
    for name, (image, _) in expected.items():
        image.save(tmp_path / name)
    palette.save(tmp_path / "palette_transparent.png", transparency=bytes([0] * 256))  # PIL warns on convert("RGB")
    expected["palette_transparent.png"] = (palette, (200, 30, 10))
    assert Image.open(tmp_path / "sixteen_bit.png").mode.startswith("I")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, (_, pixel) in expected.items():
            loaded = load_rgb_image(tmp_path / name)
            assert (loaded.mode, loaded.size) == ("RGB", (WIDTH, HEIGHT)), name
            assert np.abs(np.asarray(loaded)[5, 5].astype(int) - pixel).max() <= 2, (name, np.asarray(loaded)[5, 5])


def coco_folder(folder: Path, count: int = 4) -> tuple[Path, Path]:
    """``count`` images with one box each, and their instances file."""
    images = folder / "images"
    images.mkdir(parents=True)
    entries, annotations = [], []
    for index in range(count):
        name = f"{index:03d}.png"
        Image.new("RGB", (WIDTH, HEIGHT), (40 * index, 90, 150)).save(images / name)
        entries.append({"id": index + 1, "file_name": name, "width": WIDTH, "height": HEIGHT})
        annotations.append(
            {
                "id": 100 + index,
                "image_id": index + 1,
                "category_id": 1,
                "bbox": [4, 5, 20, 16],
                "area": 320,
                "iscrowd": 0,
            }
        )
    path = folder / "instances.json"
    path.write_text(
        json.dumps({"images": entries, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]})
    )
    return images, path


def damage(images: Path) -> tuple[Path, Path]:
    """The second image cut short, the third gone."""
    truncated, missing = images / "001.png", images / "002.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    missing.unlink()
    return truncated, missing


def coco_job(tmp_path: Path, images: Path, annotations: Path, *overrides: str) -> Job:
    data = [
        f"data.{split}_{kind}={path}"
        for split in ("train", "val")
        for kind, path in (("images", images), ("annotations", annotations))
    ]
    tiny = [
        "data.scales=[32]",
        "data.max_resize=64",
        "data.val_resize=32",
        "data.pin_memory=false",
        "data.size_divisibility=0",
    ]
    return Job(validated(compose_config(*SMALL, "data=coco", *data, *tiny, *overrides)), tmp_path / "run")


def test_skip_trains_on_stand_ins_warns_once_per_file_and_counts_them(tmp_path):
    images, annotations = coco_folder(tmp_path)
    truncated, missing = damage(images)
    # a loader worker reads the images: the marks reach the training process with the batches
    job = coco_job(
        tmp_path,
        images,
        annotations,
        "data.bad_samples=skip",
        "data.max_bad_fraction=0.5",
        "trainer.max_epochs=2",
        "data.num_workers=1",
        "logger.csv=true",
    )
    with pytest.warns(BadSampleWarning) as caught:
        job.run()
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, BadSampleWarning))
    assert messages == [
        f"{path} cannot be read; a stand-in sample was used in its place" for path in (truncated, missing)
    ]
    assert job.trainer.global_step == 4  # every batch trained, in both epochs
    with open(tmp_path / "run" / "csv" / "metrics.csv") as stream:
        counts = [float(row["data/bad_images"]) for row in csv.DictReader(stream) if row.get("data/bad_images")]
    assert counts[-1] == 2


def test_stand_ins_are_the_next_readable_samples(tmp_path):
    images, annotations = coco_folder(tmp_path)
    truncated, missing = damage(images)
    dataset = CocoDetection(images, annotations, bad_samples="skip")
    targets = [dataset[index][1] for index in range(4)]
    assert [int(t["image_id"]) for t in targets] == [1, 4, 4, 4]  # 2 and 3 replaced by the next readable, 4
    assert [t.get("replaces") for t in targets] == [None, str(truncated), str(missing), None]


def test_error_stops_the_run_naming_the_file(tmp_path):
    images, annotations = coco_folder(tmp_path)
    truncated, _ = damage(images)
    job = coco_job(tmp_path, images, annotations, "data.bad_samples=error")
    with pytest.raises(UnreadableImageError, match=f"^cannot read image {truncated}: "):
        job.run()


def test_too_many_bad_images_stop_the_run(tmp_path):
    images, annotations = coco_folder(tmp_path)
    damage(images)
    # skip is the default; a quarter of 4 images allows one bad image
    job = coco_job(tmp_path, images, annotations, "data.max_bad_fraction=0.25", "trainer.max_epochs=3")
    with pytest.raises(BadSampleLimitError) as error:
        job.run()
    assert str(error.value).startswith(
        "2 of the 4 train images could not be read, more than data.max_bad_fraction=0.25 of them ("
    )
    assert job.trainer.global_step <= 2  # within the first epoch, whichever of its two batches brought the second


def test_bad_samples_value_is_checked_before_anything_is_built():
    with pytest.raises(ValueError, match=r"^data.bad_samples='ignore' is not one of error, skip$"):
        Job(validated(compose_config(*SMALL, "data.bad_samples=ignore")), Path("unused"))


def test_verify_lists_every_problem_of_a_coco_folder(tmp_path, capsys):
    images, annotations = coco_folder(tmp_path, count=6)
    truncated, missing = damage(images)
    Image.new("RGB", (HEIGHT, WIDTH)).save(images / "003.png")  # turned a quarter
    exif = Image.Exif()
    exif[0x0112] = 8  # a phone photo stored 40x48, which viewers turn to the 48x40 the JSON says
    Image.new("RGB", (HEIGHT, WIDTH)).save(images / "005.png", exif=exif)
    content = json.loads(annotations.read_text())
    content["images"].append(dict(content["images"][0]))  # image id 1 twice
    content["annotations"] += [
        {"id": 200, "image_id": 5, "category_id": 1, "bbox": [60, 5, 10, 10], "iscrowd": 0},  # right of the image
        {"id": 201, "image_id": 5, "category_id": 1, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # no width
        {"id": 202, "image_id": 6, "category_id": 7, "bbox": [5, 5, 10, 10], "iscrowd": 0},  # undeclared category
        {"id": 203, "image_id": 99, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0},  # undeclared image
        {"id": 203, "image_id": 6, "category_id": 1, "bbox": [5, 5, 10], "iscrowd": 0},  # id again, three numbers
    ]
    annotations.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as exit_:
        run_command(["verify", f"images={images}", f"annotations={annotations}", "workers=2"])
    source = str(annotations)
    assert capsys.readouterr().out.splitlines() == [
        f"{source}: image id 1 is declared more than once",
        f"{source}: annotation id 203 is declared more than once",
        f"{source}: annotation 200 (004.png): box [60, 5, 10, 10] lies outside the 48x40 image",
        f"{source}: annotation 201 (004.png): box [5, 5, 0, 10] has no area",
        f"{source}: annotation 202 (005.png) has category id 7, which is not declared",
        f"{source}: annotation 203 is of image id 99, which is not declared",
        f"{source}: annotation 203 (005.png): bbox [5, 5, 10] is not four numbers [x, y, width, height]",
        f"{truncated}: cannot be read: image file is truncated",
        f"{missing}: missing",
        f"{images / '003.png'}: is 40x48 pixels, the JSON says 48x40 (rotated?); its boxes would be wrong",
        f"{images / '005.png'}: is stored 40x48, and its EXIF orientation 8 turns it to the 48x40 the JSON says, as "
        "viewers show it: its boxes were likely drawn on the turned image, but training reads the stored pixels; "
        "save it upright (PIL.ImageOps.exif_transpose) and keep the JSON",
    ]
    assert exit_.value.code == "11 problems in 7 images, 11 annotations, 1 categories"


def test_verify_of_a_clean_folder(tmp_path, capsys):
    images, annotations = coco_folder(tmp_path)
    run_command(["verify", f"images={images}", f"annotations={annotations}"])
    assert capsys.readouterr().err == "no problems: 4 images, 4 annotations, 1 categories\n"
