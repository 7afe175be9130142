"""The inference API on a checkpoint trained here: pixels of the original image, the LightningModule's own
numbers, thresholds and top-k, class names, published DETR weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from detr_backbone.data import ShapesDataset, collate_detection, detr_val_transforms
from detr_backbone.detection.boxes import per_image
from detr_backbone.inference import Detections, Predictor, UnnamedClassesWarning, load_detector
from detr_backbone.inference.fusion import FusedResidualBlock, FusedStemConv, fusion_supported
from detr_backbone.inference.predictor import size_groups
from detr_backbone.training import DetrModule
from detr_backbone.training.job import build_module, validated

from .jobs import compose_config
from .tiny_checkpoint import CLASS_NAMES, NUM_QUERIES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint  # trained once a session (tests/conftest.py)


@pytest.fixture(scope="module")
def module(checkpoint):
    """The checkpoint as Lightning itself loads it: the reference the API must agree with."""
    return DetrModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()


def images(count: int = 3, min_size: int = 40, max_size: int = 72) -> list:
    """PIL images of different sizes, with their raw targets."""
    dataset = ShapesDataset(count, min_size=min_size, max_size=max_size, split="test")
    return [dataset.render(index) for index in range(count)]


def module_detections(module: DetrModule, sample, transform=None) -> dict[str, torch.Tensor]:
    """The LightningModule's post-processed detections of one image alone, best score first."""
    dataset = ShapesDataset(1)  # its transform: the evaluation transform of the shapes data
    image, target = (transform or dataset.transforms)(*sample)
    batch, targets = collate_detection([(image, target)])
    with torch.no_grad():
        (found,) = per_image(*module.detector.detections(module(batch), torch.stack([t["orig_size"] for t in targets])))
    order = found["scores"].argsort(descending=True, stable=True)
    return {key: value[order] for key, value in found.items()}


def assert_same(detections: Detections, reference: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(detections.scores, reference["scores"])
    torch.testing.assert_close(detections.boxes, reference["boxes"])
    assert torch.equal(detections.labels, reference["labels"])


def test_one_call_on_images_of_different_sizes_equals_the_lightning_module(checkpoint, module):
    samples = images()
    sizes = [(image.height, image.width) for image, _ in samples]
    assert len(set(sizes)) == 3
    predictor = Predictor.from_checkpoint(checkpoint, threshold=0.0, batch_size=1)
    found = predictor([image for image, _ in samples])
    assert [d.image_size for d in found] == sizes and all(len(d) == NUM_QUERIES for d in found)
    for detections, sample in zip(found, samples):
        assert_same(detections, module_detections(module, sample))


def test_resized_inputs_give_boxes_in_the_original_pixels(checkpoint, module):
    samples = images()
    predictor = Predictor.from_checkpoint(checkpoint, threshold=0.0, batch_size=1, size=96, max_size=160)
    found = predictor([image for image, _ in samples])
    for detections, (image, target) in zip(found, samples):
        assert_same(detections, module_detections(module, (image, target), detr_val_transforms(96, 160)))
        x0, y0, x1, y1 = detections.boxes.unbind(1)
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= image.width).all() and (y1 <= image.height).all()
    # the model saw the image at shorter side 96: boxes scaled back are not those of the unresized run
    plain = Predictor.from_checkpoint(checkpoint, threshold=0.0, batch_size=1)(samples[0][0])
    assert not torch.allclose(plain.boxes, found[0].boxes, atol=1e-2)


def test_paths_pil_images_and_tensors_give_the_same_detections(checkpoint, tmp_path):
    (image, _), *_ = images(1)
    image.save(tmp_path / "shape.png")
    pixels = TF.pil_to_tensor(image)
    predictor = Predictor.from_checkpoint(checkpoint, threshold=0.0)
    reference = predictor(image)
    for same in (tmp_path / "shape.png", str(tmp_path / "shape.png"), pixels, pixels.float() / 255):
        found = predictor(same)
        torch.testing.assert_close(found.boxes, reference.boxes)
        torch.testing.assert_close(found.scores, reference.scores)
    stacked = predictor(torch.stack([pixels, pixels]))  # a (B, 3, H, W) tensor is B images
    assert len(stacked) == 2 and torch.allclose(stacked[1].scores, reference.scores, atol=1e-5)
    with pytest.raises(ValueError, match=r"must be \(3, H, W\), uint8 .* got \(4, 8, 8\) torch.uint8"):
        predictor(torch.zeros(4, 8, 8, dtype=torch.uint8))


def test_images_of_one_size_batch_like_one_by_one(checkpoint):
    samples = images(3, 56, 56)
    alone = Predictor.from_checkpoint(checkpoint, threshold=0.0, batch_size=1)([image for image, _ in samples])
    together = Predictor.from_checkpoint(checkpoint, threshold=0.0, batch_size=3)([image for image, _ in samples])
    for one, batched in zip(alone, together):
        torch.testing.assert_close(one.scores, batched.scores, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(one.boxes, batched.boxes, atol=1e-3, rtol=1e-4)


def test_batches_group_similar_sizes():
    sizes = [(50, 60), (40, 40), (50, 61), (40, 40), (90, 20)]
    assert size_groups(sizes, 2) == [[1, 3], [0, 2], [4]]
    assert size_groups(sizes, 8) == [[1, 3, 0, 2, 4]]


def test_threshold_and_top_k_are_obeyed(checkpoint):
    image = images(1)[0][0]
    everything = Predictor.from_checkpoint(checkpoint, threshold=0.0)(image)
    scores = everything.scores.tolist()
    assert len(scores) == NUM_QUERIES and scores == sorted(scores, reverse=True)
    middle = scores[2]
    kept = Predictor.from_checkpoint(checkpoint, threshold=middle)(image)
    assert kept.scores.tolist() == [s for s in scores if s >= middle] and len(kept) == 3
    best_two = Predictor.from_checkpoint(checkpoint, threshold=0.0, top_k=2)(image)
    assert best_two.scores.tolist() == scores[:2] and torch.equal(best_two.boxes, everything.boxes[:2])
    # per call, over the predictor's defaults
    predictor = Predictor.from_checkpoint(checkpoint)
    assert len(predictor(image, threshold=1.0)) == 0
    assert predictor(image, threshold=0.0, top_k=1).scores.tolist() == scores[:1]
    with pytest.raises(ValueError, match=r"top_k=0 must be >= 1"):
        predictor(image, top_k=0)


def test_class_names_come_from_the_checkpoint(checkpoint, tmp_path):
    predictor = Predictor.from_checkpoint(checkpoint, threshold=0.0)
    assert predictor.class_names == CLASS_NAMES and predictor.category_ids == [1, 2, 3]
    found = predictor(images(1)[0][0])
    assert found.names == [CLASS_NAMES[label] for label in found.labels.tolist()]
    # a checkpoint written before class names were saved
    old = torch.load(checkpoint, weights_only=True)
    del old["hyper_parameters"]["class_names"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.warns(
        UnnamedClassesWarning, match=r"old.ckpt does not name its 3 classes: they are called 'class 0' to 'class 2'"
    ):
        unnamed = Predictor.from_checkpoint(tmp_path / "old.ckpt", threshold=0.0)
    assert unnamed.class_names == ["class 0", "class 1", "class 2"]
    torch.testing.assert_close(unnamed(images(1)[0][0]).scores, found.scores)


def test_published_detr_checkpoints_load_with_detr_evaluation_size(checkpoint, tmp_path):
    ours = load_detector(checkpoint)
    torch.save({"model": ours.detector.state_dict()}, tmp_path / "detr.pth")  # DETR's own layout
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        published = load_detector(tmp_path / "detr.pth")
    assert published.source == "DETR checkpoint" and (published.size, published.max_size) == (800, 1333)
    assert published.class_names == ["class 0", "class 1", "class 2"] and published.category_ids == [0, 1, 2]
    assert any("do not record dilation" in str(w.message) for w in caught)
    image = images(1)[0][0]
    mine = Predictor.from_loaded(ours, threshold=0.0)(image)
    theirs = Predictor.from_loaded(published, threshold=0.0, size=None)(image)
    torch.testing.assert_close(theirs.scores, mine.scores)
    torch.testing.assert_close(theirs.boxes, mine.boxes)


def test_bfloat16_stays_close_to_float32(checkpoint):
    image = images(1)[0][0]
    full = Predictor.from_checkpoint(checkpoint, threshold=0.0)(image)
    half = Predictor.from_checkpoint(checkpoint, threshold=0.0, dtype="bfloat16")(image)
    assert half.scores.dtype == torch.float32  # post-processing runs in float32 whatever the weights
    assert (half.scores - full.scores).abs().max() < 0.05
    with pytest.raises(ValueError, match=r"dtype='float8' is not one of float32, bfloat16, float16"):
        Predictor.from_checkpoint(checkpoint, dtype="float8")


# --- oneDNN-fused ResNet blocks (Predictor's fuse): the plain path's detections, within float rounding ---

needs_fusion = pytest.mark.skipif(
    not fusion_supported(torch.device("cpu"), torch.float32), reason="no oneDNN on this CPU"
)


def frozen_bn_detector(backbone: str, *overrides: str, seed: int = 0) -> torch.nn.Module:
    """A small random detector of the default head (DINO's, on three levels: the whole ResNet) on a torchvision
    ResNet with frozen BatchNorm whose buffers are far from identity."""
    torch.manual_seed(seed)
    cfg = compose_config(
        f"backbone={backbone}",
        "model.num_feature_levels=3",
        "hidden_dim=32",
        "model.enc_layers=1",
        "model.dec_layers=1",
        "model.dim_feedforward=64",
        f"model.num_queries={NUM_QUERIES}",
        *overrides,
    )
    detector = build_module(validated(cfg), len(CLASS_NAMES)).detector
    with torch.no_grad():
        for name, buffer in detector.backbone.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bias")):
                buffer.normal_(0.0, 0.2)
            elif name.endswith("weight"):
                buffer.uniform_(0.5, 1.5)
    return detector.eval()


def predictors(detector: torch.nn.Module, **options) -> tuple[Predictor, Predictor]:
    """The plain path and the fused one (the default), on two copies of one detector."""
    plain = Predictor(copy.deepcopy(detector), CLASS_NAMES, threshold=0.0, fuse=False, **options)
    return plain, Predictor(detector, CLASS_NAMES, threshold=0.0, **options)


def assert_same_detections(found: list[Detections], expected: list[Detections], tolerance: float = 1e-5) -> None:
    """Scores within ``tolerance``, boxes within ``tolerance`` of the image size (pixels), same labels."""
    for got, want in zip(found, expected, strict=True):
        torch.testing.assert_close(got.scores, want.scores, atol=tolerance, rtol=0)
        torch.testing.assert_close(got.boxes, want.boxes, atol=tolerance * max(want.image_size), rtol=0)
        assert torch.equal(got.labels, want.labels)


@needs_fusion
@pytest.mark.parametrize(
    ("backbone", "overrides", "blocks"),
    [
        # Bottleneck blocks with folded norms (the default): stem + 16 blocks
        pytest.param("resnet50", [], 17, marks=pytest.mark.slow),
        ("resnet18", ["backbone.fold_frozen_bn=false"], 9),  # BasicBlock, norms applied after the conv: stem + 8
    ],
)
def test_fused_resnet_gives_the_plain_path_detections(backbone, overrides, blocks):
    detector = frozen_bn_detector(backbone, *overrides)
    keys = {key: value.clone() for key, value in detector.state_dict().items()}
    plain, fused = predictors(detector, batch_size=2)
    assert (plain.fused_blocks, fused.fused_blocks) == (0, blocks)
    body = fused.detector.backbone[0].body
    assert isinstance(body.conv1, FusedStemConv) and isinstance(body.layer1[0], FusedResidualBlock)
    # the module tree keeps its names and tensors: the state dict loads into an unfused detector
    state = fused.detector.state_dict()
    assert list(state) == list(keys) and all(torch.equal(state[key], value) for key, value in keys.items())
    plain.detector.load_state_dict(state)
    # three sizes (a new shape packs the weights again), one batch padded to the larger image
    samples = [image for image, _ in images(3, 40, 72)]
    alone = [fused(image) for image in samples]
    # folded norms compute the same float operations; unfolded ones are folded here (rounding differs)
    tolerance = 1e-5 if not overrides else 1e-4
    assert_same_detections(alone, [plain(image) for image in samples], tolerance)
    assert_same_detections(fused(samples[:2]), plain(samples[:2]), tolerance)


@needs_fusion
def test_fused_blocks_follow_weight_changes_and_refuse_training():
    detector = frozen_bn_detector("resnet18")
    plain, fused = predictors(detector)
    image = images(1)[0][0]
    before = fused(image)
    assert_same_detections([before], [plain(image)])
    # new weights loaded in place (as load_state_dict does) are packed again on the next call
    other = frozen_bn_detector("resnet18", seed=1).state_dict()
    fused.detector.load_state_dict(other)
    plain.detector.load_state_dict(other)
    after = fused(image)
    assert_same_detections([after], [plain(image)])
    assert not torch.allclose(after.scores, before.scores)
    with pytest.raises(RuntimeError, match="for inference only"):
        fused.detector.train()


@needs_fusion
def test_fusion_applies_where_it_can():
    detector = frozen_bn_detector("resnet18")
    with pytest.raises(ValueError, match=r"fuse=True needs oneDNN on a CPU .* got compile=True"):
        Predictor(copy.deepcopy(detector), CLASS_NAMES, fuse=True, compile=True)
    with pytest.raises(ValueError, match=r"fuse=True needs oneDNN on a CPU .* got cpu / torch.float16"):
        Predictor(copy.deepcopy(detector), CLASS_NAMES, fuse=True, dtype="float16")
    assert Predictor(copy.deepcopy(detector), CLASS_NAMES, dtype="float16").fused_blocks == 0  # None: where it applies
    # a GroupNorm backbone (the tiny checkpoint's) has nothing to fuse and runs as it is
    assert Predictor(frozen_bn_detector("resnet18_gn"), CLASS_NAMES).fused_blocks == 0


@pytest.mark.skipif(not fusion_supported(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bfloat16 on this CPU")
def test_fused_bfloat16_stays_close_to_plain_bfloat16():
    plain, fused = predictors(frozen_bn_detector("resnet18"), dtype="bfloat16")
    assert fused.fused_blocks == 9
    image = images(1)[0][0]
    # the fused residual add and ReLU round once, the plain path after every step: bfloat16 rounding apart
    assert (fused(image).scores - plain(image).scores).abs().max() < 0.05
