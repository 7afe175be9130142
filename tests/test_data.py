"""Datasets, DETR's transforms, batching and the DataModule, checked against hand-computed numbers."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from torchvision.ops import box_convert

from detr_backbone import NestedTensor
from detr_backbone.data import (
    DETR_SCALES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoDetection,
    DetectionCollate,
    DetectionDataModule,
    ShapesDataset,
    build_datamodule,
    collate_detection,
    detection_target,
    detr_train_transforms,
    detr_val_transforms,
)


def pixel_boxes(target: dict) -> torch.Tensor:
    """Normalized cxcywh boxes back to absolute XYXY pixels of the transformed image."""
    height, width = target["size"].tolist()
    return box_convert(target["boxes"] * torch.tensor([width, height, width, height]), "cxcywh", "xyxy")


def near(value: int, options, tolerance: int = 1) -> bool:
    return any(abs(value - option) <= tolerance for option in options)


def same_image(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


# ---------------------------------------------------------------- shapes


def test_shapes_are_deterministic_per_index_and_differ_between_splits():
    first, again = ShapesDataset(4, seed=3), ShapesDataset(4, seed=3)
    val = ShapesDataset(4, seed=3, split="val")
    for index in (2, 0, 3):  # any order: every index has its own random stream
        image, target = first[index]
        image_again, target_again = again[index]
        assert torch.equal(image, image_again)
        assert target.keys() == target_again.keys()
        assert all(torch.equal(target[key], target_again[key]) for key in target)
    other_seed = ShapesDataset(4, seed=4)
    assert not any(same_image(first[i][0], val[i][0]) or same_image(first[i][0], other_seed[i][0]) for i in range(4))


def test_shapes_cache_draws_each_image_once_and_serves_the_same_samples(monkeypatch):
    plain, cached = ShapesDataset(5, seed=7), ShapesDataset(5, seed=7, cache=True)
    drawn = []
    draw = ShapesDataset._draw
    monkeypatch.setattr(
        ShapesDataset, "_draw", lambda self, index: drawn.append((self is cached, index)) or draw(self, index)
    )
    for index in (3, 1, 3, 1, 3):
        image, target = cached[index]
        expected_image, expected_target = plain[index]
        assert torch.equal(image, expected_image)
        assert all(torch.equal(target[key], expected_target[key]) for key in expected_target)
    assert [index for is_cached, index in drawn if is_cached] == [3, 1]
    assert [index for is_cached, index in drawn if not is_cached] == [3, 1, 3, 1, 3]
    for value in target.values():  # a consumer that edits its sample in place leaves the cache intact
        value.fill_(-1)
    assert all(torch.equal(value, plain[3][1][key]) for key, value in cached[3][1].items())


def test_shapes_image_sizes_vary_within_bounds_and_targets_are_well_formed():
    dataset = ShapesDataset(24, min_size=40, max_size=60, max_objects=3)
    sizes = set()
    for index in range(len(dataset)):
        image, target = dataset[index]
        height, width = image.shape[1:]
        sizes.add((height, width))
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert 40 <= height <= 60 and 40 <= width <= 60
        assert target["size"].tolist() == target["orig_size"].tolist() == [height, width]
        assert target["image_id"].dtype == torch.int64 and target["image_id"].item() == index
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert 1 <= len(labels) <= 3 and boxes.shape == (len(labels), 4)
        assert ((labels >= 0) & (labels < ShapesDataset.num_classes)).all()
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        assert (xyxy >= 0).all() and (xyxy <= 1 + 1e-6).all()
        # sides are 20%..60% of the image side (the tight box of a triangle or ellipse is the drawn one)
        assert (boxes[:, 2:] >= 0.15).all() and (boxes[:, 2:] <= 0.61).all()
    assert len({h for h, _ in sizes}) > 5 and len({w for _, w in sizes}) > 5
    assert len(sizes) > 12  # heights and widths are drawn independently
    assert ShapesDataset.class_names == ("rectangle", "ellipse", "triangle")


def drawn_kind(dataset: ShapesDataset, index: int, fill_ratio: dict[str, tuple[float, float]]) -> str | None:
    """On a noise-free single-shape image with a plain background, every pixel unlike the corners is the
    shape: assert that its extent is the box and its fill ratio within the kind's range; return the kind.
    None for a graded background (or a shape on a corner), where foreground is not simply "not corner"."""
    image, target = dataset.render(index)
    pixels = np.asarray(image).astype(int)
    corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]]
    if not (corners == corners[0]).all():
        return None
    foreground = (pixels != corners[0]).any(axis=-1)
    ys, xs = np.nonzero(foreground)
    assert target["boxes"].tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
    x0, y0, x1, y1 = target["boxes"][0].int().tolist()
    kind = dataset.class_names[target["labels"].item()]
    low, high = fill_ratio[kind]
    assert low <= foreground[y0:y1, x0:x1].mean() <= high, kind
    return kind


def test_shapes_boxes_are_exactly_the_tight_boxes_of_the_drawn_pixels():
    """Noise-free single-shape images on a plain background: the shape's extent must equal the box,
    and its fill ratio tells the class."""
    dataset = ShapesDataset(60, max_objects=1, noise=0.0, seed=11)
    fill_ratio = {"rectangle": (1.0, 1.0), "ellipse": (0.72, 0.84), "triangle": (0.42, 0.58)}
    checked = set()
    for index in range(len(dataset)):
        kind = drawn_kind(dataset, index, fill_ratio)
        if kind is None:
            continue
        checked.add(kind)
        # the default transform: the same box, normalized by the image size, in cxcywh
        _, transformed = dataset[index]
        assert torch.allclose(pixel_boxes(transformed), dataset.render(index)[1]["boxes"], atol=1e-4)
    assert checked == {"rectangle", "ellipse", "triangle"}


def test_shapes_default_transform_is_imagenet_normalization():
    dataset = ShapesDataset(1, seed=5)
    pil_image, _ = dataset.render(0)
    image, _ = dataset[0]
    pixel = torch.tensor(np.asarray(pil_image)[7, 9], dtype=torch.float32) / 255
    expected = (pixel - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(image[:, 7, 9], expected, atol=1e-6)
    assert type(image) is torch.Tensor  # not a tv_tensors.Image


def test_shapes_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split='tarin'"):
        ShapesDataset(3, split="tarin")
    with pytest.raises(ValueError, match="min_size <= max_size"):
        ShapesDataset(3, min_size=80, max_size=60)
    with pytest.raises(IndexError, match="index 3"):
        ShapesDataset(3).render(3)


# ---------------------------------------------------------------- collate


def sample(height: int, width: int, value: float) -> tuple[torch.Tensor, dict]:
    return torch.full((3, height, width), value), {"labels": torch.tensor([int(value)])}


def test_collate_pads_into_a_nested_tensor_whose_mask_is_the_padding():
    batch = [sample(5, 7, 1.0), sample(8, 3, 2.0)]
    images, targets = collate_detection(batch)
    assert isinstance(images, NestedTensor) and images.tensors.shape == (2, 3, 8, 7)
    assert [t["labels"].item() for t in targets] == [1, 2]
    expected_mask = torch.ones(2, 8, 7, dtype=torch.bool)
    expected_mask[0, :5, :7] = False
    expected_mask[1, :8, :3] = False
    assert torch.equal(images.mask, expected_mask)
    assert torch.equal(images.tensors[:, 0] != 0, ~expected_mask)  # zeros exactly where masked


def test_collate_rounds_the_padded_size_to_size_divisibility_and_pickles():
    collate = pickle.loads(pickle.dumps(DetectionCollate(size_divisibility=32)))
    images, _ = collate([sample(33, 20, 1.0), sample(10, 64, 1.0)])
    assert images.tensors.shape == (2, 3, 64, 64)
    assert images.mask[0, 33:].all() and not images.mask[0, :33, :20].any() and images.mask[0, :, 20:].all()
    with pytest.raises(ValueError, match="empty batch"):
        collate_detection([])


# ---------------------------------------------------------------- COCO

IMAGES = {  # file name: (width, height)
    "a.png": (40, 30),
    "b.png": (20, 50),
    "c.png": (32, 32),
}


def write_coco(folder: Path, images: list[dict], annotations: list[dict]) -> Path:
    categories = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]  # deliberately unsorted
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture
def coco_folder(tmp_path: Path) -> tuple[Path, Path]:
    for index, (name, size) in enumerate(IMAGES.items()):
        image = Image.new("RGB", size, (60 * index, 100, 200))
        ImageDraw.Draw(image).rectangle((4, 6, 13, 13), fill="white")  # in a.png: exactly the dog's box
        image.save(tmp_path / name)
    images = [
        {"id": 10 + i, "file_name": name, "width": width, "height": height}
        for i, (name, (width, height)) in enumerate(IMAGES.items())
    ]
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [4, 6, 10, 8], "area": 80, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [30, 20, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1},
        {"id": 4, "image_id": 11, "category_id": 3, "bbox": [0, 0, 20, 50], "area": 1000},  # no iscrowd key
        {"id": 5, "image_id": 11, "category_id": 7, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},
    ]
    return tmp_path, write_coco(tmp_path, images, annotations)


def test_coco_maps_categories_drops_crowd_and_converts_boxes(coco_folder):
    image_dir, annotations = coco_folder
    dataset = CocoDetection(image_dir, annotations)
    assert len(dataset) == 3
    assert dataset.category_ids == [3, 7] and dataset.class_names == ["cat", "dog"] and dataset.num_classes == 2

    image, target = dataset[0]
    assert image.shape == (3, 30, 40)
    assert target["image_id"].item() == 10
    assert target["orig_size"].tolist() == target["size"].tolist() == [30, 40]
    assert target["labels"].tolist() == [1, 0]  # dog (id 7) -> 1, cat (id 3) -> 0; the crowd cat is gone
    # [4, 6, 10, 8] xywh -> xyxy [4, 6, 14, 14]; [30, 20, 20, 20] -> [30, 20, 50, 40] clipped to [30, 20, 40, 30]
    expected = torch.tensor([[9 / 40, 10 / 30, 10 / 40, 8 / 30], [35 / 40, 25 / 30, 10 / 40, 10 / 30]])
    assert torch.allclose(target["boxes"], expected, atol=1e-6)

    _, target = dataset[1]  # the zero-width box is dropped, the whole-image box is kept
    assert target["labels"].tolist() == [0]
    assert torch.allclose(target["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))

    image, target = dataset[2]
    assert image.shape == (3, 32, 32)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_val_transforms_resize_the_shorter_side_and_cap_the_longer(coco_folder):
    image_dir, annotations = coco_folder
    dataset = CocoDetection(image_dir, annotations, detr_val_transforms(size=60, max_size=100))
    image, target = dataset[0]  # 30x40 -> shorter side 60 -> 60x80
    assert image.shape == (3, 60, 80) and target["size"].tolist() == [60, 80]
    assert target["orig_size"].tolist() == [30, 40]
    assert torch.allclose(pixel_boxes(target), torch.tensor([[8.0, 12, 28, 28], [60, 40, 80, 60]]), atol=1e-4)
    image, target = dataset[1]  # 50x20 -> 150x60 would exceed 100 -> longer side 100, shorter 40
    assert image.shape == (3, 100, 40)
    image, target = dataset[2]
    assert image.shape == (3, 60, 60) and target["boxes"].shape == (0, 4)


def test_train_transforms_flip_mirrors_normalized_boxes(coco_folder):
    """With a crop window at least as large as the image, both branches keep the whole image, so the
    normalized boxes only depend on the flip: cx -> 1 - cx, the rest unchanged."""
    image_dir, annotations = coco_folder
    whole_image = dict(scales=(64,), max_size=1000, crop_scales=(48,), crop_min=10_000, crop_max=10_000)
    plain = CocoDetection(image_dir, annotations)
    flipped = CocoDetection(image_dir, annotations, detr_train_transforms(flip_prob=1.0, **whole_image))
    kept = CocoDetection(image_dir, annotations, detr_train_transforms(flip_prob=0.0, **whole_image))
    _, reference = plain[0]
    mirrored = reference["boxes"].clone()
    mirrored[:, 0] = 1 - mirrored[:, 0]
    for seed in range(4):
        torch.manual_seed(seed)
        image, target = flipped[0]
        torch.manual_seed(seed)  # the same random branch and sizes, without the flip
        unflipped_image, unflipped = kept[0]
        assert min(image.shape[1:]) == 64 and target["size"].tolist() == list(image.shape[1:])
        assert torch.allclose(target["boxes"], mirrored, atol=1e-5)
        assert torch.equal(target["labels"], reference["labels"])
        assert torch.allclose(unflipped["boxes"], reference["boxes"], atol=1e-5)
        assert torch.allclose(image, unflipped_image.flip(-1), atol=1e-4)
        # the white square moved with its box: bright at the mirrored box centre
        x, y = pixel_boxes(target)[0, :2].add(pixel_boxes(target)[0, 2:]).div(2).long().tolist()
        assert (image[:, y, x] > 2).all()


def test_default_train_transforms_keep_boxes_and_labels_aligned_including_empty(coco_folder):
    image_dir, annotations = coco_folder
    dataset = CocoDetection(image_dir, annotations, detr_train_transforms())
    torch.manual_seed(0)
    for _ in range(6):
        for index in range(len(dataset)):
            image, target = dataset[index]
            height, width = image.shape[1:]
            assert target["size"].tolist() == [height, width]
            # shorter side on one of the scales (to int rounding), unless the longer side hit max_size
            assert near(min(height, width), DETR_SCALES) or near(max(height, width), [1333])
            assert max(height, width) <= 1333
            boxes = target["boxes"]
            assert boxes.dtype == torch.float32 and boxes.shape == (len(target["labels"]), 4)
            xyxy = box_convert(boxes, "cxcywh", "xyxy")
            assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all() and (boxes[:, 2:] > 0).all()
            if index == 2:
                assert boxes.shape == (0, 4)


def test_transforms_accept_an_empty_target():
    image = Image.new("RGB", (50, 40))
    target = detection_target(torch.zeros(0, 4), torch.zeros(0), 1, 40, 50)
    for transforms in (detr_train_transforms(), detr_val_transforms()):
        output, result = transforms(image, target)
        assert result["boxes"].shape == (0, 4) and result["labels"].shape == (0,)
        assert result["size"].tolist() == list(output.shape[1:])


def test_coco_errors_name_the_file(tmp_path: Path, coco_folder):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json"):
        CocoDetection(tmp_path, broken)
    not_coco = tmp_path / "list.json"
    not_coco.write_text("[]")
    with pytest.raises(ValueError, match="list.json"):
        CocoDetection(tmp_path, not_coco)

    Path(tmp_path / "corrupt.png").write_bytes(b"this is not a png")
    valid = tmp_path / "valid.png"
    Image.new("RGB", (30, 30), (1, 2, 3)).save(valid)
    Path(tmp_path / "truncated.png").write_bytes(valid.read_bytes()[:40])
    names = ["missing.png", "corrupt.png", "truncated.png"]
    images = [{"id": i, "file_name": name, "width": 30, "height": 30} for i, name in enumerate(names)]
    dataset = CocoDetection(tmp_path, write_coco(tmp_path, images, []))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.png")):
        dataset[0]
    with pytest.raises(ValueError, match=str(tmp_path / "corrupt.png")):
        dataset[1]
    with pytest.raises(ValueError, match=str(tmp_path / "truncated.png")):
        dataset[2]


# ---------------------------------------------------------------- DataModule

SHAPES_CONFIG = dict(
    kind="shapes",
    batch_size=4,
    num_workers=0,
    pin_memory=False,
    persistent_workers=False,
    size_divisibility=32,
    seed=0,
    train_size=10,
    val_size=6,
    min_size=40,
    max_size=56,
    max_objects=2,
)


def image_ids(loader) -> list[int]:
    return [target["image_id"].item() for _, targets in loader for target in targets]


def test_shapes_datamodule_yields_padded_batches_of_the_configured_size():
    datamodule = build_datamodule(SHAPES_CONFIG)
    datamodule.setup("fit")
    assert datamodule.num_classes == 3 and tuple(datamodule.class_names) == ShapesDataset.class_names
    train = list(datamodule.train_dataloader())
    assert [len(targets) for _, targets in train] == [4, 4, 2]  # drop_last is off
    for images, targets in train:
        assert isinstance(images, NestedTensor) and images.tensors.shape[0] == len(targets)
        assert images.tensors.shape[-1] % 32 == 0 and images.tensors.shape[-2] % 32 == 0
        for padding, target in zip(images.mask, targets):
            height, width = target["size"].tolist()
            assert not padding[:height, :width].any() and padding.sum() == padding.numel() - height * width
    assert sorted(image_ids(datamodule.train_dataloader())) == list(range(10))
    assert image_ids(datamodule.val_dataloader()) == list(range(6))  # not shuffled
    assert datamodule.dataset("test") is datamodule.dataset("val")


def test_train_order_is_seeded_and_val_split_differs_from_train():
    orders = [image_ids(build_datamodule({**SHAPES_CONFIG, "seed": seed}).train_dataloader()) for seed in (0, 0, 1)]
    assert orders[0] == orders[1] and orders[0] != orders[2] and orders[0] != list(range(10))
    datamodule = build_datamodule(SHAPES_CONFIG)
    train_image, _ = datamodule.dataset("train")[0]
    val_image, _ = datamodule.dataset("val")[0]
    assert not same_image(train_image, val_image)


def test_worker_loaders_and_persistent_workers_only_with_workers():
    train, val = ShapesDataset(6, max_size=48, min_size=32), ShapesDataset(3, split="val")
    with_workers = DetectionDataModule(train, val, batch_size=3, num_workers=2)
    assert sorted(image_ids(with_workers.train_dataloader())) == list(range(6))  # samples and collate cross processes
    # Not iterated: a persistent worker pool would outlive the test until garbage collection joins it.
    assert DetectionDataModule(train, val, num_workers=2, persistent_workers=True).train_dataloader().persistent_workers
    assert not DetectionDataModule(train, val, persistent_workers=True).train_dataloader().persistent_workers


def test_coco_datamodule_from_a_dictconfig(coco_folder):
    image_dir, annotations = coco_folder
    cfg = OmegaConf.create(
        dict(
            kind="coco",
            batch_size=2,
            num_workers=0,
            pin_memory=False,
            persistent_workers=False,
            size_divisibility=0,
            seed=0,
            train_images=str(image_dir),
            train_annotations=str(annotations),
            val_images=str(image_dir),
            val_annotations=str(annotations),
            scales=[64, 72],
            max_resize=120,
            val_resize=64,
        )
    )
    datamodule = build_datamodule(cfg)
    assert datamodule.num_classes == 2 and datamodule.class_names == ["cat", "dog"]
    batches = list(datamodule.val_dataloader())
    assert [len(targets) for _, targets in batches] == [2, 1]
    assert [min(t["size"].tolist()) for _, targets in batches for t in targets] == [64, 48, 64]  # b.png: 120x48
    images, targets = next(iter(datamodule.train_dataloader()))
    assert images.tensors.shape[0] == 2
    for height, width in (target["size"].tolist() for target in targets):
        assert near(min(height, width), (64, 72)) or near(max(height, width), [120])


@dataclass
class SmallShapes:  # a dataclass config; the loader fields it leaves out keep DetectionDataModule's defaults
    kind: str = "shapes"
    batch_size: int = 3
    train_size: int = 5
    val_size: int = 2
    max_objects: int = 1


def test_build_datamodule_from_a_dataclass_with_defaults():
    datamodule = build_datamodule(SmallShapes())
    assert datamodule.hparams.num_workers == 0 and datamodule.hparams.size_divisibility == 0
    assert [len(targets) for _, targets in datamodule.train_dataloader()] == [3, 2]
    assert all(len(target["labels"]) == 1 for _, targets in datamodule.val_dataloader() for target in targets)


def test_build_datamodule_rejects_unknown_kinds_and_missing_fields():
    with pytest.raises(ValueError, match=r"^unknown data kind 'kitti'; valid kinds: shapes, coco, yolo, voc$"):
        build_datamodule({**SHAPES_CONFIG, "kind": "kitti"})
    with pytest.raises(ValueError, match="train_annotations"):
        build_datamodule({"kind": "coco", "train_images": "x", "val_images": "y", "val_annotations": "z"})
    coco = {"kind": "coco", "train_images": "a", "train_annotations": "b", "val_images": "c", "val_annotations": "d"}
    with pytest.raises(ValueError, match="data.cache=true applies to data=shapes only"):
        build_datamodule({**coco, "cache": True})
