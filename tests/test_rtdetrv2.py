"""The RT-DETRv2 head: its encoder's position encoding, discrete sampling and varifocal loss against hand
computations, the denoising queries' padding, and the detector in training and evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from detr_backbone.detection import build_detector
from detr_backbone.detection.matcher import BaseHungarianMatcher
from detr_backbone.detection.multiscale.matcher import FocalHungarianMatcher
from detr_backbone.detection.multiscale.sampling.discrete import discrete_attention
from detr_backbone.detection.realtime import VarifocalSetCriterion, grid_sine_embedding, varifocal_criterion
from detr_backbone.detection.rtdetrv2 import RTDETRv2, RtDetrV2Config

TARGETS = [
    {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.2, 0.3, 0.2, 0.4]])},
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.7, 0.6, 0.2, 0.2]])},
]
JOINER = {
    "backbone": {"_target_": "detr_backbone.Backbone", "name": "resnet18", "levels": [2, 3]},
    "position": {"_target_": "detr_backbone.PositionEmbeddingSine"},
    "hidden_dim": 32,
}
SMALL = dict(num_queries=6, dec_layers=2, nheads=4, dim_feedforward=64, num_feature_levels=2, dn_number=4)


def small_rtdetrv2(**overrides) -> RTDETRv2:
    torch.manual_seed(0)
    return build_detector(JOINER, RtDetrV2Config(**{**SMALL, **overrides}), num_classes=3)


def test_the_encoders_position_encoding_is_rt_detrs_grid_order():
    # RT-DETR's: meshgrid(arange(w), arange(h), indexing="ij") flattened gives position k the coordinates
    # (k // h, k % h); channels sin/cos of the first, then sin/cos of the second, at dim / 4 frequencies
    height, width, dim = 3, 5, 8
    encoding = grid_sine_embedding(height, width, dim)[0]
    for k in range(height * width):
        first, second = k // height, k % height
        expected = []
        for function in (math.sin, math.cos):
            expected += [function(first / 10000 ** (i / 2)) for i in range(2)]
        for function in (math.sin, math.cos):
            expected += [function(second / 10000 ** (i / 2)) for i in range(2)]
        torch.testing.assert_close(encoding[k], torch.tensor(expected))


def test_discrete_sampling_reads_the_nearest_value():
    # one image, two levels (2x3 and 1x2), one head of 2 channels, one query, one point per level
    value = torch.arange(16, dtype=torch.float32).view(1, 8, 1, 2)
    locations = torch.tensor([[0.6, 0.9], [0.1, 0.2]]).view(1, 1, 1, 2, 1, 2)  # (x, y) per level
    weights = torch.tensor([0.25, 0.75]).view(1, 1, 1, 2, 1)
    # level 0: column int(0.6 * 3 + 0.5) = 2, row int(0.9 * 2 + 0.5) = 2 -> clamped to 1: position 1 * 3 + 2 = 5
    # level 1: column int(0.1 * 2 + 0.5) = 0, row int(0.2 * 1 + 0.5) = 0: position 6 + 0 = 6
    expected = 0.25 * value[0, 5, 0] + 0.75 * value[0, 6, 0]
    output = discrete_attention(value, [(2, 3), (1, 2)], locations, weights)
    torch.testing.assert_close(output[0, 0], expected)


def test_the_varifocal_loss_on_a_hand_computed_case():
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]])  # one image, two queries, two classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]])
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]])}
    criterion = VarifocalSetCriterion(2, FocalHungarianMatcher(), 0.75, 2.0, {"loss_ce": 1.0})
    losses = criterion.assigned_losses(
        logits, boxes, [target], [(torch.tensor([0]), torch.tensor([0]))], torch.tensor(1.0)
    )
    iou = 0.5  # the 0.2x0.2 box inside the 0.2x0.4 one, same centre
    total = 0.0
    for query in range(2):
        for label in range(2):
            x = logits[0, query, label].item()
            p = 1 / (1 + math.exp(-x))
            positive = query == 0 and label == 1
            t = iou if positive else 0.0
            weight = iou if positive else 0.75 * p**2
            total += -weight * (t * math.log(p) + (1 - t) * math.log(1 - p))
    assert losses["loss_ce"].item() == pytest.approx(total, rel=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(1 - iou, rel=1e-6)


def test_the_criterion_has_rt_detrs_costs_weights_and_losses():
    criterion = varifocal_criterion(RtDetrV2Config(), num_classes=3)
    assert isinstance(criterion.matcher, BaseHungarianMatcher)
    assert (criterion.matcher.cost_class, criterion.matcher.cost_bbox, criterion.matcher.cost_giou) == (2, 5, 2)
    assert (criterion.matcher.alpha, criterion.alpha, criterion.gamma) == (0.25, 0.75, 2.0)
    assert criterion.loss_weights == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def test_training_outputs_every_layer_the_proposals_and_the_denoising_queries():
    model = small_rtdetrv2().train()
    torch.manual_seed(1)
    out = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], TARGETS)
    assert out["pred_logits"].shape == (2, 6, 3) and out["pred_boxes"].shape == (2, 6, 4)
    assert len(out["aux_outputs"]) == 1 and out["interm_outputs"]["pred_logits"].shape == (2, 6, 3)
    dn = out["dn_meta"]
    assert (dn.groups, dn.group_size) == (2, 2) and out["dn_outputs"]["pred_logits"].shape == (2, 8, 3)
    losses = varifocal_criterion(RtDetrV2Config(**SMALL), num_classes=3)(out, TARGETS)
    assert {"loss_ce", "loss_ce_0", "loss_ce_interm", "loss_ce_dn", "loss_ce_dn_0", "loss_giou_dn"} <= set(losses)
    assert all(torch.isfinite(value) for value in losses.values())


def test_padding_slots_of_the_denoising_queries_hold_rt_detrs_zero_content_and_zero_box():
    model = small_rtdetrv2().train()
    seen = {}
    model.decoder.register_forward_hook(lambda module, args, output: seen.update(args=args))
    torch.manual_seed(2)
    model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], TARGETS)
    _, dn_content, dn_box_logits, _ = seen["args"]
    # the second image has one object of the batch's two: its odd slots are padding
    assert not dn_content[1, 1::2].any()  # the embedding's padding row is zero
    torch.testing.assert_close(dn_box_logits[1, 1::2], torch.full((4, 4), math.log(1e-5)))


def test_evaluation_stops_at_eval_idx_and_gives_its_boxes():
    model = small_rtdetrv2(dec_layers=3, eval_idx=1).eval()
    images = [torch.rand(3, 64, 80)]
    with torch.no_grad():
        out = model(images)
        model.train()  # every layer's outputs (no denoising without targets), BatchNorm on its running statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        layers = model(images)
    assert set(out) == {"pred_logits", "pred_boxes"}
    torch.testing.assert_close(out["pred_boxes"], layers["aux_outputs"][1]["pred_boxes"])
    torch.testing.assert_close(out["pred_logits"], layers["aux_outputs"][1]["pred_logits"])


def test_discrete_cross_attention_freezes_the_sampling_offsets():
    model = small_rtdetrv2(cross_attn_method="discrete")
    offsets = [p for n, p in model.named_parameters() if "cross_attn.sampling_offsets" in n]
    assert offsets and not any(p.requires_grad for p in offsets)
    with torch.no_grad():
        assert model.eval()([torch.rand(3, 64, 64)])["pred_boxes"].isfinite().all()


def test_norms_of_the_encoder_and_decoder_have_no_weight_decay():
    model = small_rtdetrv2()
    groups = RtDetrV2Config(**SMALL).parameter_groups(model, 1e-4)
    (norms,) = groups
    expected = {
        id(p)
        for name, module in model.named_modules()
        if name.startswith(("encoder.", "decoder.")) and isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm))
        for p in module.parameters(recurse=False)
    }
    assert {id(p) for p in norms["params"]} == expected and norms["weight_decay"] == 0.0 and norms["lr"] == 1e-4


@pytest.mark.parametrize("values", [{"eval_idx": 6}, {"cross_attn_method": "nearest"}, {"num_feature_levels": 4}])
def test_bad_settings_are_named(values):
    with pytest.raises(ValueError, match=f"model.{next(iter(values))}"):
        RtDetrV2Config(**values)


# Every position of a 128x96 image's three levels is a query: random weights score the proposals within float
# noise of each other, so which 20 are the best would be decided by rounding; with all of them, the decoder's
# outputs are the same set in any order (its self-attention does not see the order)
QUERIES = 16 * 12 + 8 * 6 + 4 * 3
# a small RT-DETRv2-R18 in Hugging Face's terms: R18 backbone, hidden 64, 2 decoder layers, 20 queries
HUGGING_FACE_SMALL = dict(
    backbone_config={
        "model_type": "rt_detr_resnet",
        "layer_type": "basic",
        "depths": [2, 2, 2, 2],
        "hidden_sizes": [64, 128, 256, 512],
        "out_features": ["stage2", "stage3", "stage4"],
    },
    encoder_in_channels=[128, 256, 512],
    decoder_in_channels=[64, 64, 64],
    encoder_hidden_dim=64,
    d_model=64,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    decoder_layers=2,
    num_queries=QUERIES,
    hidden_expansion=0.5,
    num_labels=3,
    id2label={0: "cat", 1: "dog", 2: "bird"},
    label2id={"cat": 0, "dog": 1, "bird": 2},
    num_denoising=10,
)


def randomise_batch_norms(model: torch.nn.Module) -> None:
    """Running statistics and affine terms away from 0 / 1, so that a misplaced BatchNorm shows."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d) or type(module).__name__.endswith("FrozenBatchNorm2d"):
            for name in ("weight", "bias", "running_mean"):
                getattr(module, name).data.copy_(
                    torch.randn(getattr(module, name).shape, generator=generator) * 0.1 + (name == "weight")
                )
            module.running_var.data.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


@pytest.fixture(scope="module")
def hugging_face_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.RTDetrV2ForObjectDetection(transformers.RTDetrV2Config(**HUGGING_FACE_SMALL)).eval()
    randomise_batch_norms(model)
    folder = tmp_path_factory.mktemp("rtdetrv2_hf")
    model.save_pretrained(folder)
    images = torch.rand(2, 3, 128, 96)  # not square: the encoder's grid order shows
    with torch.no_grad():
        out = model(pixel_values=images)
    return folder, images, out.logits, out.pred_boxes


def test_a_hugging_face_rtdetrv2_folder_gives_its_own_logits_and_boxes(hugging_face_folder):
    from detr_backbone.inference import load_detector

    folder, images, logits, boxes = hugging_face_folder
    loaded = load_detector(folder)
    assert loaded.class_names == ["cat", "dog", "bird"]
    assert (loaded.input.normalize, loaded.input.resize) == (False, "square")
    with torch.no_grad():
        out = loaded.detector(list(images))
    assert_same_queries(out, logits, boxes)


def assert_same_queries(out: dict, logits: torch.Tensor, boxes: torch.Tensor) -> None:
    """Each image's queries (logits and box) equal the reference's within 1e-4, one to one in some order."""
    ours = torch.cat([out["pred_logits"], out["pred_boxes"]], -1)
    reference = torch.cat([logits, boxes], -1)
    for image in range(len(ours)):
        distance = torch.cdist(ours[image], reference[image], p=float("inf"))
        nearest = distance.min(1)
        assert nearest.values.max() < 1e-4
        assert sorted(nearest.indices.tolist()) == list(range(reference.shape[1]))


def test_the_released_layout_loads_strictly_with_its_ema_weights(hugging_face_folder, tmp_path):
    # our detector's tensors under RT-DETRv2's names (the backbone's from the reference's key list), with its
    # derived buffers, saved as a training checkpoint: {"ema": {"module": state}, "model": other weights}
    from detr_backbone.backbones.resnet_vd import presnet_to_timm
    from detr_backbone.inference import load_detector

    from .test_resnet_vd import PRESNET_KEYS

    folder, images, logits, boxes = hugging_face_folder
    ours = load_detector(folder).detector.state_dict()
    reference_keys = [key for key in PRESNET_KEYS["resnet18d"] if not key.endswith("num_batches_tracked")]
    backbone_names = {next(iter(presnet_to_timm({key: torch.zeros(1)}))): key for key in reference_keys}
    released = {backbone_names.get(key, key): value for key, value in ours.items()}
    assert not any(key.startswith("backbone.0.") for key in released)
    for layer in range(2):
        released[f"decoder.decoder.layers.{layer}.cross_attn.num_points_scale"] = torch.full((12,), 0.25)
    released["decoder.anchors"], released["decoder.valid_mask"] = torch.zeros(1, 10, 4), torch.ones(1, 10, 1)
    stale = {key: torch.zeros_like(value) for key, value in released.items()}
    path = tmp_path / "rtdetrv2_r18vd_small.pth"
    torch.save({"ema": {"module": released, "updates": 10}, "model": stale, "last_epoch": 3}, path)
    loaded = load_detector(path)
    assert loaded.source == "RT-DETRv2 checkpoint"
    # released files do not record the query count: every published config has 300, this small model QUERIES
    assert loaded.detector.decoder.num_queries == 300
    loaded.detector.decoder.num_queries = QUERIES
    with torch.no_grad():
        out = loaded.detector(list(images))
    assert_same_queries(out, logits, boxes)


def test_a_hugging_face_rtdetrv2_onto_the_shapes_classes_by_name(hugging_face_folder, tmp_path):
    import json
    import shutil

    from detr_backbone.training.job import Job, validated

    from .jobs import TINY, compose_config

    folder = tmp_path / "hf"
    shutil.copytree(hugging_face_folder[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "Rectangle", "1": "dog", "2": "ellipse"}
    (folder / "config.json").write_text(json.dumps(config))
    size = ["backbone=resnet18vd", "hidden_dim=64", "model.num_queries=20", "model.dec_layers=2"]
    size += ["model.dim_feedforward=128", "model.expansion=0.5", "model.dn_number=10"]
    overrides = [*TINY, "model=rtdetrv2", *size]
    run = Job(validated(compose_config(*overrides, f"init_from={folder}")), tmp_path / "run")
    fresh = Job(validated(compose_config(*overrides)), tmp_path / "fresh")
    state, fresh_state = run.module.detector.state_dict(), fresh.module.detector.state_dict()
    published = load_detector_state(folder)
    heads = ["decoder.enc_score_head", "decoder.dec_score_head.0", "decoder.dec_score_head.1"]
    for head in heads:
        for suffix in ("weight", "bias"):
            key = f"{head}.{suffix}"
            # rectangle <- row 0 (case aside), ellipse <- row 2, triangle fresh
            assert torch.equal(state[key][0], published[key][0]) and torch.equal(state[key][1], published[key][2])
            assert torch.equal(state[key][2], fresh_state[key][2])
    table = "decoder.denoising_class_embed.weight"
    assert torch.equal(state[table][:2], published[table][[0, 2]]) and torch.equal(state[table][3], published[table][3])
    carried = [key for key in published if not key.startswith(tuple(heads)) and key != table]
    assert all(torch.equal(state[key], published[key]) for key in carried)
    # the R18 preset keeps its BatchNorms live (RT-DETR's recipe); the published frozen ones had no count
    live_counts = {key for key in state if key.startswith("backbone.") and key.endswith("num_batches_tracked")}
    assert set(state) - set(published) == live_counts and len(live_counts) == 23
    report = (tmp_path / "run" / "init_from.txt").read_text()
    assert (
        "classes carried over (2): rectangle <- row 0 (Rectangle), ellipse <- row 2\n" in report
        and "new classes (1): triangle" in report
    )


def load_detector_state(folder) -> dict[str, torch.Tensor]:
    from detr_backbone.inference import load_detector

    return load_detector(folder).detector.state_dict()


def test_a_hugging_face_rtdetr_v1_folder_and_its_weights_file_read_as_rtdetrv2(tmp_path):
    # RT-DETR's decoder is RT-DETRv2's with bilinear sampling, under the same names
    transformers = pytest.importorskip("transformers")
    from detr_backbone.inference import load_detector

    config = {key: value for key, value in HUGGING_FACE_SMALL.items() if key != "num_denoising"}
    torch.manual_seed(1)
    model = transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(**config)).eval()
    randomise_batch_norms(model)
    model.save_pretrained(tmp_path)
    images = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        reference = model(pixel_values=images)
    for path in (tmp_path, tmp_path / "model.safetensors"):
        loaded = load_detector(path)
        assert loaded.source == "Hugging Face RT-DETR (Hub names)" and loaded.class_names == ["cat", "dog", "bird"]
        with torch.no_grad():
            assert_same_queries(loaded.detector(list(images)), reference.logits, reference.pred_boxes)


def test_the_released_layout_on_hgnetv2_l_loads_strictly(tmp_path):
    """RT-DETRv2-HGNetv2-L's released keys (the backbone's from the reference's key list): our detector on
    timm's hgnetv2_b4, saved under them, comes back with its outputs."""
    from detr_backbone.backbones.hgnetv2 import hgnetv2_to_timm
    from detr_backbone.inference import load_detector

    from .test_resnet_vd import HGNETV2_KEYS

    joiner = {
        "backbone": {"_target_": "detr_backbone.TimmBackbone", "name": "hgnetv2_b4", "levels": [2, 3, 4]},
        "position": {"_target_": "detr_backbone.PositionEmbeddingSine"},
        "hidden_dim": 64,
    }
    torch.manual_seed(0)
    head = RtDetrV2Config(num_queries=300, dec_layers=2, dim_feedforward=128, expansion=0.5, dn_number=10)
    ours = build_detector(joiner, head, num_classes=80).eval()
    randomise_batch_norms(ours)
    reference_keys = [key for key in HGNETV2_KEYS["L"] if not key.endswith("num_batches_tracked")]
    names = {next(iter(hgnetv2_to_timm({key: torch.zeros(1)}))): key for key in reference_keys}
    released = {names.get(key, key): value for key, value in ours.state_dict().items()}
    assert not any(key.startswith("backbone.0.") for key in released)
    torch.save({"model": released}, tmp_path / "rtdetrv2_hgnetv2_l.pth")
    loaded = load_detector(tmp_path / "rtdetrv2_hgnetv2_l.pth")
    assert loaded.detector.backbone[0].body.default_cfg["architecture"] == "hgnetv2_b4"
    assert loaded.class_names[:2] == ["person", "bicycle"] and len(loaded.class_names) == 80
    images = [torch.rand(3, 160, 128)]
    with torch.no_grad():
        expected, got = ours(images), loaded.detector(images)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "experiment, backbone, epochs, lr_backbone, decoder_layers, expansion, scales",
    [
        ("rtdetrv2_r50vd_coco", "resnet50d", 72, 1e-5, 6, 1.0, 13),
        ("rtdetrv2_r18vd_coco", "resnet18d", 120, 1e-4, 3, 0.5, 0),
    ],
)
def test_the_published_recipes_compose(experiment, backbone, epochs, lr_backbone, decoder_layers, expansion, scales):
    from .jobs import compose_config

    cfg = compose_config(f"experiment={experiment}")
    assert (cfg.model._target_, cfg.backbone.name, cfg.backbone.levels) == (RtDetrV2Config._target_, backbone, None)
    assert (cfg.lr, cfg.lr_backbone, cfg.weight_decay, cfg.clip_max_norm) == (1e-4, lr_backbone, 1e-4, 0.1)
    assert (cfg.optimizer.schedule, cfg.optimizer.warmup_steps, cfg.lr_drop) == ("step", 2000, 1000)
    assert (cfg.callbacks.ema.enabled, cfg.callbacks.ema.decay, cfg.callbacks.ema.warmup_steps) == (True, 0.9999, 2000)
    assert (cfg.trainer.max_epochs, cfg.trainer.devices * cfg.data.batch_size) == (epochs, 16)
    assert (cfg.data.augment, cfg.data.size, cfg.data.val_resize, len(cfg.data.multi_scale)) == (
        "rtdetr",
        640,
        640,
        scales,
    )
    assert (cfg.model.dec_layers, cfg.model.expansion, cfg.model.num_queries, cfg.hidden_dim) == (
        decoder_layers,
        expansion,
        300,
        256,
    )
    # R18 trains its whole backbone with live BatchNorm; R50 freezes the stem and every BatchNorm
    assert (cfg.backbone.freeze_norm, cfg.backbone.trainable_layers) == (
        (False, 5) if backbone == "resnet18d" else (True, 4)
    )
