"""Augmentation policies (data/augment.py): each against torchvision's own transforms under the same random
state, Mosaic and MixUp against boxes computed by hand, the phases at chosen fractions, the switch seen by
persistent workers, multi-scale batches and the config's errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.ops import box_convert
from torchvision.transforms import v2

from detr_backbone.data import ShapesDataset, build_datamodule, detection_target, detr_train_transforms
from detr_backbone.data.augment import (
    DEIM_POINTS,
    RTDETR_STOP,
    AugmentState,
    Mosaic,
    MultiScale,
    PolicyTransforms,
    build_policy,
    check_augment,
    mixup,
    sample_seed,
    shapes_policy_transforms,
)
from detr_backbone.data.collate import DetectionCollate
from detr_backbone.data.transforms import IMAGENET_MEAN, IMAGENET_STD, detr_base_transforms
from detr_backbone.training.callbacks.augment_phase import AugmentPhase, run_progress
from detr_backbone.training.config import DataConfig

SHAPES = {"kind": "shapes", "train_size": 12, "val_size": 4, "min_size": 48, "max_size": 64, "seed": 5}


def shapes_sample(index: int) -> tuple[Image.Image, dict]:
    return ShapesDataset(32, seed=1, min_size=48, max_size=64, max_objects=3).render(index)


def policy(name: str, size: int = 64) -> PolicyTransforms:
    plain = detr_base_transforms()
    return PolicyTransforms(build_policy(name, size, detr_train_transforms, plain), seed=7)


def seeded(seed: int, epoch: int, image_id: int) -> None:
    torch.random.default_generator.manual_seed(sample_seed(seed, epoch, image_id))


def assert_same_sample(actual: tuple, expected: tuple) -> None:
    assert actual[0].shape == expected[0].shape
    torch.testing.assert_close(actual[0], expected[0])
    torch.testing.assert_close(actual[1]["boxes"], expected[1]["boxes"])
    assert torch.equal(actual[1]["labels"], expected[1]["labels"])


def torchvision_rtdetr(size: int, augment: bool = True) -> v2.Compose:
    """RT-DETR's pipeline written with torchvision's transforms alone (its IoU crop as RandomApply)."""
    pieces = [
        v2.RandomPhotometricDistort(p=0.5),
        v2.RandomApply([v2.RandomZoomOut(fill=0)], p=0.5),
        v2.RandomApply([v2.RandomIoUCrop()], p=0.8),
        v2.SanitizeBoundingBoxes(min_size=1),
    ]
    return v2.Compose(
        [
            *(pieces if augment else []),
            v2.RandomHorizontalFlip(p=0.5),
            v2.Resize([size, size]),
            v2.SanitizeBoundingBoxes(min_size=1),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.SanitizeBoundingBoxes(),
        ]
    )


def detr_format(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    height, width = image.shape[-2:]
    boxes = box_convert(target["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh")
    return image.as_subclass(torch.Tensor), {**target, "boxes": boxes / torch.tensor([width, height, width, height])}


@pytest.mark.parametrize("progress, augment", [(0.0, True), (RTDETR_STOP, False)])
def test_rtdetr_matches_torchvision_under_the_same_random_state(progress, augment):
    transforms = policy("rtdetr")
    transforms.state.set(3, progress)
    for index in range(16):
        image, target = shapes_sample(index)
        actual = transforms(image, {key: value.clone() for key, value in target.items()})
        seeded(7, 3, index)
        expected = detr_format(*torchvision_rtdetr(64, augment)(image, target))
        assert_same_sample(actual, expected)
        assert actual[0].shape == (3, 64, 64)


def test_detr_policy_is_detrs_transforms_seeded_per_sample():
    transforms = policy("detr")
    transforms.state.set(2, 0.5)
    image, target = shapes_sample(3)
    seeded(7, 2, 3)
    expected = detr_train_transforms()(image, {key: value.clone() for key, value in target.items()})
    assert_same_sample(transforms(image, target), expected)


def test_an_image_without_boxes_passes_every_policy():
    image = Image.new("RGB", (40, 30))
    target = detection_target(torch.zeros(0, 4), torch.zeros(0), 0, 30, 40)
    for name in ("detr", "rtdetr", "deim", "none"):
        transforms = policy(name, 32)
        transforms.state.set(0, 0.3)
        _, out = transforms(image, {key: value.clone() for key, value in target.items()})
        assert out["boxes"].shape == (0, 4)


def solid(height: int, width: int, value: int) -> tuple[Image.Image, dict]:
    image = Image.new("RGB", (width, height), (value, value, value))
    box = torch.tensor([[0.0, 0.0, width, height]])  # the whole image
    return image, detection_target(box, torch.tensor([value]), value, height, width)


def test_mosaic_places_each_resized_image_in_its_quarter():
    samples = [solid(40, 60, 10), solid(50, 50, 20), solid(60, 30, 30), solid(40, 40, 40)]
    canvas, target = Mosaic(20, {"degrees": 0.0}).place(samples)
    # shorter sides to 20: (20, 30), (20, 20), (40, 20), (20, 20); cells 40 high, 30 wide
    expected = torch.tensor([[0, 0, 30, 20], [30, 0, 50, 20], [0, 40, 20, 80], [30, 40, 50, 60]], dtype=torch.float32)
    assert canvas.shape == (3, 80, 60)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), expected)
    assert target["boxes"].canvas_size == (80, 60)
    assert target["labels"].tolist() == [10, 20, 30, 40]
    for (left, top, right, bottom), value in zip(expected.int().tolist(), (10, 20, 30, 40)):
        assert (canvas[:, top:bottom, left:right] == value).all()
    assert (canvas[:, 20:40, :] == 0).all()  # below the short top row: the fill


def test_mosaic_affine_moves_boxes_like_the_image():
    samples = [solid(40, 40, 50 + 40 * i) for i in range(4)]
    torch.manual_seed(0)
    canvas, target = Mosaic(20)(samples)
    boxes = target["boxes"].as_subclass(torch.Tensor)
    assert canvas.shape == (3, 40, 40)
    assert (boxes >= 0).all() and (boxes[:, 2] <= 40).all() and (boxes[:, 3] <= 40).all()
    for (left, top, right, bottom), value in zip(boxes.round().int().tolist(), target["labels"].tolist()):
        if right - left > 6 and bottom - top > 6:  # each box's centre pixel has its image's value
            assert canvas[0, (top + bottom) // 2, (left + right) // 2] == value


def test_mixup_blends_the_images_and_keeps_both_boxes():
    first = (torch.full((3, 8, 8), 1.0), {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([1])})
    second = (torch.full((3, 4, 4), 3.0), {"boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1]]), "labels": torch.tensor([2])})
    image, target = mixup(first, second, 0.45)
    torch.testing.assert_close(image, torch.full((3, 8, 8), 0.45 * 1.0 + 0.55 * 3.0))
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]))
    assert target["labels"].tolist() == [1, 2]


def test_deim_mixing_phase_draws_partners_reproducibly_from_seed_epoch_and_index():
    def dataset(**probabilities):
        data = ShapesDataset(16, seed=1, min_size=48, max_size=64)
        data.transforms = PolicyTransforms(
            build_policy("deim", 64, detr_train_transforms, detr_base_transforms(), probabilities), seed=7
        )
        data.transforms.bind(data)
        data.transforms.state.set(9, 0.2)
        return data

    mixed, again = dataset(mosaic_prob=1.0, mixup_prob=1.0), dataset(mosaic_prob=1.0, mixup_prob=1.0)
    plain = dataset(mosaic_prob=0.0, mixup_prob=0.0)
    more = sum(len(mixed[index][1]["boxes"]) > len(plain[index][1]["boxes"]) for index in range(6))
    assert more >= 4  # four images and a partner's boxes against one image's
    for index in (4, 0):
        assert_same_sample(mixed[index], again[index])
    mixed.transforms.state.set(10, 0.2)
    assert not torch.equal(mixed[4][0], again[4][0])


def test_phases_switch_at_the_references_fractions():
    deim = build_policy("deim", 64, detr_train_transforms, detr_base_transforms())
    starts = [phase.start for phase in deim.phases]
    assert starts == [0.0, *DEIM_POINTS] and DEIM_POINTS == (4 / 58, 29 / 58, 50 / 58)
    assert [deim.phase_at(epoch / 58).mosaic_prob for epoch in (3, 4, 28, 29, 50)] == [0, 0.5, 0.5, 0, 0]
    assert [deim.phase_at(epoch / 58).mixup_prob for epoch in (3, 4, 28, 29)] == [0, 0.5, 0.5, 0]
    assert [deim.phase_at(epoch / 58).multi_scale for epoch in (49, 50, 57)] == [True, False, False]
    rtdetr = build_policy("rtdetr", 64, detr_train_transforms, detr_base_transforms())
    assert rtdetr.phase_at(70 / 72) is rtdetr.phases[0] and rtdetr.phase_at(71 / 72) is rtdetr.phases[1]


def test_run_progress_is_the_fraction_of_whichever_limit_ends_the_run():
    def trainer(**values):
        defaults = {"max_epochs": 72, "current_epoch": 0, "max_steps": -1, "num_training_batches": 10}
        return SimpleNamespace(**{**defaults, "accumulate_grad_batches": 1, **values})

    assert run_progress(trainer(current_epoch=71)) == 71 / 72
    # 10 batches, 3 accumulated: 4 optimizer steps an epoch, 12 done when epoch 3 starts
    assert run_progress(trainer(max_epochs=-1, max_steps=48, current_epoch=3, accumulate_grad_batches=3)) == 0.25
    assert run_progress(trainer(current_epoch=1, max_steps=20)) == 0.5
    schedule = policy("deim")
    datamodule = SimpleNamespace(augment_schedule=schedule)
    for hook in ("on_train_start", "on_train_epoch_start"):  # a resumed run's first epoch: only on_train_start
        schedule.state.set(0, 0.0)
        getattr(AugmentPhase(), hook)(SimpleNamespace(**vars(trainer(current_epoch=29)), datamodule=datamodule), None)
        assert (schedule.state.epoch, schedule.state.progress) == (29, 29 / 72)


def test_persistent_workers_see_the_phase_switch():
    datamodule = build_datamodule({**SHAPES, "augment": "deim", "num_workers": 1, "persistent_workers": True})
    dataset = datamodule.dataset("train")
    loader = DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True, collate_fn=list)
    state = datamodule.augment_schedule.state
    batches = {}
    for epoch, progress in ((0, 0.0), (1, 0.3), (2, 0.95)):
        state.set(epoch, progress)
        batches[epoch] = next(iter(loader))  # the same worker process every time
        for index, (image, target) in enumerate(batches[epoch]):
            assert_same_sample((image, target), dataset[index])  # the main process, same phase and epoch
    # flip and resize only at 0 and 0.95: the same boxes up to the flip; Mosaic / crops in between
    assert any(len(a[1]["boxes"]) != len(b[1]["boxes"]) for a, b in zip(batches[0], batches[1]))


def test_multi_scale_resizes_each_batch_to_one_drawn_side_until_the_phase_stops():
    datamodule = build_datamodule({**SHAPES, "augment": "rtdetr", "multi_scale": [32, 48, 96]})
    loader = datamodule.train_dataloader()
    schedule = datamodule.augment_schedule
    sides = set()
    for epoch in range(6):
        schedule.state.set(epoch, epoch / 72)
        loader.sampler.set_epoch(epoch)
        for batch, targets in loader:
            side = batch.tensors.shape[-1]
            assert batch.tensors.shape[-2:] == (side, side) and not batch.mask.any()
            assert all(target["size"].tolist() == [side, side] for target in targets)
            sides.add(side)
    assert sides == {32, 48, 96}
    schedule.state.set(71, RTDETR_STOP)
    batch, targets = next(iter(loader))
    assert batch.tensors.shape[-2:] == (64, 64)


def test_multi_scale_keeps_normalised_boxes_and_scales_unequal_images():
    transforms = policy("none")
    transforms.state.set(0, 0.0)
    resize = MultiScale((96,), transforms.policy, transforms.state)
    boxes = torch.tensor([[0.5, 0.5, 0.25, 0.5]])
    batch = [
        (torch.rand(3, 64, 48), {"boxes": boxes, "labels": torch.tensor([0]), "image_id": torch.tensor(0)}),
        (torch.rand(3, 32, 64), {"boxes": boxes, "labels": torch.tensor([1]), "image_id": torch.tensor(1)}),
    ]
    images, targets = DetectionCollate(resize=resize)(batch)
    assert images.tensors.shape[-2:] == (96, 96)  # 64 x 48 and 32 x 64 scaled by 96 / 64
    assert [target["size"].tolist() for target in targets] == [[96, 72], [48, 96]]
    assert all(torch.equal(target["boxes"], boxes) for target in targets)


def test_default_shapes_data_is_unchanged_and_resumes_with_the_same_samples():
    datamodule = build_datamodule(SHAPES)
    plain = ShapesDataset(12, seed=5, min_size=48, max_size=64)
    for index in (0, 7):
        assert_same_sample(datamodule.dataset("train")[index], plain[index])
    # a resumed run rebuilds its transforms: what the first process drew before must not matter
    original, resumed = (shapes_policy_transforms({**SHAPES, "augment": "rtdetr"})[0] for _ in range(2))
    for schedule in (original, resumed):
        schedule.state.set(6, 0.2)
    for index in (1, 3):
        original(*shapes_sample(index))
    image, target = shapes_sample(2)
    assert_same_sample(resumed(image, dict(target)), original(image, dict(target)))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"augment": "yolo"}, "data.augment='yolo' is not one of detr, rtdetr, deim, none"),
        ({"mosaic_prob": 1.5}, "data.mosaic_prob=1.5 must be a probability in [0, 1]"),
        ({"iou_crop_prob": -0.1}, "data.iou_crop_prob=-0.1 must be a probability in [0, 1]"),
        ({"multi_scale": [64, 0]}, "data.multi_scale=[64, 0] must list sides >= 1"),
    ],
)
def test_bad_policy_values_fail_with_the_key_named(values, message):
    with pytest.raises(ValueError) as error:
        DataConfig(**values)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match=message.split("=")[0]):
        build_datamodule({**SHAPES, **values})


def test_shapes_square_side_is_the_data_max_size_and_val_follows_the_policy():
    for name, val_shape in (("rtdetr", (3, 64, 64)), ("deim", (3, 64, 64))):
        datamodule = build_datamodule({**SHAPES, "augment": name})
        assert datamodule.dataset("train")[0][0].shape == (3, 64, 64)
        assert datamodule.dataset("val")[0][0].shape == val_shape
    image, target = build_datamodule({**SHAPES, "augment": "none"}).dataset("val")[0]
    assert image.shape[-2:] == tuple(target["orig_size"].tolist())  # shapes at their own size, as before


def test_policy_state_is_shared_memory():
    state = AugmentState()
    assert state._values.is_shared()  # so a forked or spawned worker reads the value the trainer writes


def test_render_augment_writes_one_row_per_phase(tmp_path):
    from detr_backbone.commands.render import main as render_main

    overrides = ["data.train_size=8", "data.val_size=2", "data.augment=deim"]
    (path,) = render_main(["kind=augment", "samples=3", "tile=64", f"output_dir={tmp_path}", *overrides])
    assert path == tmp_path / "augment.png"
    # 3 samples of 64 x 64 a row, 4 phases, 2-pixel gaps around every tile
    assert Image.open(path).size == (3 * 66 + 2, 4 * 66 + 2)


@pytest.mark.slow
def test_a_fit_with_a_persistent_worker_trains_each_epoch_in_its_phase(tmp_path):
    import pytorch_lightning as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_index):
            images, targets = batch
            self.seen += [(self.current_epoch, image, target) for image, target in zip(images.tensors, targets)]
            return self.weight * images.tensors.mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    values = {**SHAPES, "train_size": 8, "batch_size": 4, "augment": "deim", "num_workers": 1}
    datamodule = build_datamodule({**values, "persistent_workers": True})
    module = Recorder()
    trainer = pl.Trainer(
        max_epochs=4,
        callbacks=[AugmentPhase()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=datamodule)
    reference = build_datamodule(values).dataset("train")  # the main process, set to each epoch's phase
    assert sorted({epoch for epoch, _, _ in module.seen}) == [0, 1, 2, 3]
    for epoch, image, target in module.seen:
        reference.transforms.state.set(epoch, epoch / 4)
        expected = reference[int(target["image_id"])]
        height, width = target["size"].tolist()
        assert_same_sample((image[:, :height, :width], target), expected)


def test_augment_stop_moves_where_rtdetr_leaves_only_flips():
    # RT-DETRv2-R18's 120 epochs: its augmentation off from epoch 117 (progress 117/120 when that epoch starts)
    r18 = build_policy("rtdetr", 64, detr_train_transforms, detr_base_transforms(), stop=0.975)
    assert [phase.start for phase in r18.phases] == [0.0, 0.975]
    assert r18.phase_at(116 / 120) is r18.phases[0] and r18.phase_at(117 / 120) is r18.phases[1]
    default = build_policy("rtdetr", 64, detr_train_transforms, detr_base_transforms())
    assert default.phase_at(118 / 120) is default.phases[0] and default.phase_at(119 / 120) is default.phases[1]
    with pytest.raises(ValueError, match=r"^data.augment_stop=1.5 must be a fraction of the run in \(0, 1\]"):
        check_augment({"augment": "rtdetr", "augment_stop": 1.5})


def test_mosaic_phase_and_stop_give_deim_small_its_132_epoch_plan():
    # DEIM-D-FINE-S: Mosaic and MixUp from epoch 4 to 64, RT-DETR's pieces to 120, flips only in the last 12 of 132
    plan = build_policy(
        "deim", 64, detr_train_transforms, detr_base_transforms(), stop=120 / 132, mosaic_phase=[4 / 132, 64 / 132]
    )
    starts = [phase.start for phase in plan.phases]
    assert starts == [0.0, 4 / 132, 64 / 132, 120 / 132]
    by_epoch = [plan.phase_at(epoch / 132) for epoch in (3, 4, 63, 64, 119, 120)]
    assert [phase.mosaic_prob for phase in by_epoch] == [0.0, 0.5, 0.5, 0.0, 0.0, 0.0]
    assert [phase.multi_scale for phase in by_epoch] == [True, True, True, True, True, False]
    # the defaults are DEIM-D-FINE-L's 58-epoch plan
    default = build_policy("deim", 64, detr_train_transforms, detr_base_transforms())
    assert [phase.start for phase in default.phases] == [0.0, 4 / 58, 29 / 58, 50 / 58]
    with pytest.raises(ValueError, match=r"^data.mosaic_phase=\[0.5, 0.2\] must be \[start, end\] fractions"):
        check_augment({"augment": "deim", "mosaic_phase": [0.5, 0.2]})
    with pytest.raises(ValueError, match=r"the augmentation's stop \(0.800\)"):
        check_augment({"augment": "deim", "mosaic_phase": [0.1, 0.9], "augment_stop": 0.8})
