"""D-FINE's head: the weighting function and edges by hand, per-level sampling points against grid_sample level by
level, the gate's initial mix, and the detector's training and evaluation outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detr_backbone.detection import build_detector
from detr_backbone.detection.dfine import DFINE, DFineConfig
from detr_backbone.detection.dfine.decoder import DeformableAttention, Gate
from detr_backbone.detection.dfine.distribution import distances_to_boxes, expected_distances, weighting_function

JOINER = {
    "backbone": {"_target_": "detr_backbone.Backbone", "name": "resnet18", "levels": [2, 3]},
    "position": {"_target_": "detr_backbone.PositionEmbeddingSine"},
    "hidden_dim": 32,
}
SMALL = {
    "num_queries": 12,
    "dec_layers": 3,
    "nheads": 4,
    "dim_feedforward": 64,
    "num_feature_levels": 2,
    "num_points": [2, 3],
    "expansion": 0.5,
    "depth_mult": 0.34,
    "dn_number": 4,
    "num_select": 20,
}
TARGETS = [
    {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
]


def small_dfine(**overrides) -> DFINE:
    torch.manual_seed(0)
    return build_detector(JOINER, DFineConfig(**{**SMALL, **overrides}), num_classes=3)


def test_the_weighting_function_by_hand():
    # reg_max 4, up 0.5, reg_scale 4: a = 2, step = (a + 1)^(2 / 2) = 3 -> -2a, 1 - 3, 0, 3 - 1, 2a
    values = weighting_function(4, torch.tensor([0.5]), torch.tensor([4.0]))
    assert values.tolist() == [-4.0, -2.0, 0.0, 2.0, 4.0]
    # D-FINE's 33 bins: symmetric, growing geometrically, +-a next to the ends and +-2a at them
    bins = weighting_function(32, torch.tensor([0.5]), torch.tensor([4.0]))
    assert bins.shape == (33,) and bins[16] == 0 and torch.equal(bins, -bins.flip(0))
    assert bins[31].item() == pytest.approx(2.0) and bins[32].item() == pytest.approx(4.0)
    steps = bins[17:32] + 1  # s^1 .. s^15
    assert torch.allclose(steps[1:] / steps[:-1], torch.full((14,), 3.0 ** (1 / 15)))
    with pytest.raises(ValueError, match="reg_max=5 must be an even number >= 4"):
        weighting_function(5, torch.tensor([0.5]), torch.tensor([4.0]))


def test_edges_are_expectations_over_the_bins_measured_from_the_reference():
    project = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
    # one edge certain of bin 3 (W = 2), one split evenly between bins 0 and 4 (expectation 0), two at the middle
    logits = torch.full((4, 5), -1e4)
    logits[0, 3] = 0
    logits[1, [0, 4]] = 0
    logits[2:, 2] = 0
    distances = expected_distances(logits.reshape(1, 20), project)
    assert torch.allclose(distances, torch.tensor([[2.0, 0.0, 0.0, 0.0]]))
    reference = torch.tensor([[0.5, 0.5, 0.4, 0.2]])  # x in [0.3, 0.7], y in [0.4, 0.6]
    # distance 0 keeps the reference's edges; the left edge at distance 2 moves out by 2 * w / reg_scale = 0.2
    box = distances_to_boxes(reference, distances, torch.tensor([4.0]))
    assert torch.allclose(box, torch.tensor([[0.4, 0.5, 0.6, 0.2]]))  # x in [0.1, 0.7]


def test_per_level_points_read_each_level_as_grid_sample_does():
    torch.manual_seed(0)
    attention = DeformableAttention(d_model=8, n_heads=2, num_points=[1, 3], discrete=False, attention_impl="auto")
    torch.nn.init.normal_(attention.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(attention.attention_weights.weight)
    shapes = [(4, 6), (2, 3)]
    query, value = torch.randn(1, 5, 8), torch.randn(1, 4 * 6 + 2 * 3, 2, 4)
    reference = torch.rand(1, 5, 1, 4) * 0.5 + 0.25
    got = attention(query, reference, value, shapes)
    # independently: every point located and read by grid_sample on its own level, weighted by a softmax over all
    offsets = attention.sampling_offsets(query).view(1, 5, 2, 4, 2)
    weights = attention.attention_weights(query).view(1, 5, 2, 4).softmax(-1)
    unit = torch.tensor([0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3])[:, None]
    locations = (
        reference[:, :, None, 0, :2][:, :, :, None] + offsets * unit * reference[:, :, None, 0, 2:][:, :, :, None]
    )
    maps = value.split([24, 6], 1)
    expected = torch.zeros(1, 5, 2, 4)
    for head in range(2):
        for point, level in enumerate([0, 1, 1, 1]):
            height, width = shapes[level]
            grid = 2 * locations[:, :, head, point][:, :, None] - 1  # (1, 5, 1, 2)
            level_map = maps[level][:, :, head].transpose(1, 2).reshape(1, 4, height, width)
            sample = F.grid_sample(level_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            expected[:, :, head] += weights[:, :, head, point, None] * sample[0, :, :, 0].T[None]
    torch.testing.assert_close(got, expected.reshape(1, 5, 8), atol=1e-5, rtol=0)


def test_the_gate_starts_as_an_even_mix_of_query_and_attention():
    gate = Gate(4)
    query, attended = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(gate(query, attended), F.layer_norm(0.5 * query + 0.5 * attended, (4,)))


def test_training_outputs_hold_what_the_criterion_reads():
    model = small_dfine().train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    out = model(images, TARGETS)
    assert out["pred_logits"].shape == (2, 12, 3) and out["pred_corners"].shape == (2, 12, 4 * 33)
    assert out["ref_points"].shape == (2, 12, 4) and not out["ref_points"].requires_grad
    assert len(out["aux_outputs"]) == 2 and set(out["aux_outputs"][0]) == {
        "pred_logits",
        "pred_boxes",
        "pred_corners",
        "ref_points",
        "teacher_corners",
        "teacher_logits",
    }
    torch.testing.assert_close(out["aux_outputs"][0]["teacher_corners"], out["pred_corners"])
    assert out["pre_outputs"]["pred_boxes"].shape == (2, 12, 4) and out["interm_outputs"]["pred_logits"].shape == (
        2,
        12,
        3,
    )
    # denoising: every layer, each taught by the last; the padding's queries too
    dn = out["dn_meta"]
    assert len(out["dn_outputs"]) == 3 and out["dn_outputs"][0]["pred_corners"].shape == (2, dn.num_queries, 132)
    torch.testing.assert_close(out["dn_outputs"][-1]["pred_corners"], out["dn_outputs"][-1]["teacher_corners"])
    assert out["up"].item() == 0.5 and out["reg_scale"].item() == 4.0
    # the edges of a layer add to the previous layer's: its boxes stay within reach of the same references
    for layer in out["aux_outputs"]:
        torch.testing.assert_close(layer["ref_points"], out["ref_points"])


def test_evaluation_stops_at_eval_idx_and_wider_auxiliary_layers_train():
    model = small_dfine(eval_idx=-2, layer_scale=2.0)
    assert [layer.linear1.in_features for layer in model.decoder.decoder.layers] == [32, 32, 64]
    assert model.decoder.dec_bbox_head[2].layers[0].in_features == 64
    images = [torch.rand(3, 64, 64)]
    model.train()
    out = model(images, TARGETS[:1])
    assert len(out["aux_outputs"]) == 2 and out["pred_logits"].shape == (1, 12, 3)
    model.eval()
    with torch.no_grad():
        evaluated = model(images)
    # evaluation runs two layers, whose second is training's second: the same boxes
    model.train()
    for module in model.modules():  # running statistics, as in evaluation
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    with torch.no_grad():
        trained = model(images)  # no targets: no denoising
    torch.testing.assert_close(evaluated["pred_boxes"], trained["aux_outputs"][1]["pred_boxes"])


def test_the_schema_names_bad_values():
    with pytest.raises(
        ValueError,
        match=r"model.num_points=\[3, 6, 3\] must give a positive count for each of the model.num_feature_levels=2 levels",
    ):
        DFineConfig(num_feature_levels=2)
    with pytest.raises(ValueError, match="model.reg_max=7 must be an even number >= 4"):
        DFineConfig(reg_max=7)
    with pytest.raises(ValueError, match="model.activation='gelu' is not one of relu, silu"):
        DFineConfig(activation="gelu")


@pytest.mark.parametrize(
    "size, backbone, hidden, levels, layers, expansion, depth, lr, lr_backbone, epochs, stop, scales, batch",
    [
        ("n", "hgnetv2_b0", 128, 2, 3, 0.34, 0.5, 8e-4, 4e-4, 160, 0.925, 0, 128),
        pytest.param("s", "hgnetv2_b0", 256, 3, 3, 0.5, 0.34, 2e-4, 1e-4, 132, 0.909, 30, 32, marks=pytest.mark.slow),
        pytest.param("m", "hgnetv2_b2", 256, 3, 4, 1.0, 0.67, 2e-4, 2e-5, 132, 0.909, 16, 32, marks=pytest.mark.slow),
        ("l", "hgnetv2_b4", 256, 3, 6, 1.0, 1.0, 2.5e-4, 1.25e-5, 80, 0.9, 14, 32),
        pytest.param("x", "hgnetv2_b5", 384, 3, 6, 1.0, 1.0, 2.5e-4, 2.5e-6, 80, 0.9, 13, 32, marks=pytest.mark.slow),
    ],
)
def test_the_published_recipes_compose(
    size, backbone, hidden, levels, layers, expansion, depth, lr, lr_backbone, epochs, stop, scales, batch
):
    from .jobs import compose_config

    cfg = compose_config(f"experiment=dfine_hgnetv2_{size}_coco")
    assert (cfg.model._target_, cfg.backbone.name, cfg.hidden_dim) == (DFineConfig._target_, backbone, hidden)
    assert (cfg.model.num_feature_levels, cfg.model.dec_layers, cfg.model.expansion, cfg.model.depth_mult) == (
        levels,
        layers,
        expansion,
        depth,
    )
    assert cfg.model.num_points == ([6, 6] if size == "n" else [3, 6, 3])
    assert cfg.backbone.levels == ([3, 4] if size == "n" else None)  # D-FINE-N reads strides 16 and 32
    assert (cfg.model.reg_scale, cfg.model.enc_dim_feedforward) == ((8.0, 2048) if size == "x" else (4.0, None))
    assert (cfg.lr, cfg.lr_backbone, cfg.clip_max_norm) == (lr, lr_backbone, 0.1)
    assert (cfg.optimizer.schedule, cfg.optimizer.warmup_steps) == ("step", 500)
    assert (cfg.callbacks.ema.decay, cfg.callbacks.ema.warmup_steps) == (0.9999, 1000)
    assert (cfg.trainer.max_epochs, cfg.data.augment_stop, len(cfg.data.multi_scale)) == (epochs, stop, scales)
    assert cfg.trainer.devices * cfg.data.batch_size == batch
    # B0 and B2 train whole with live BatchNorm; B4 and B5 freeze the stem and every BatchNorm
    assert (cfg.backbone.freeze_norm, cfg.backbone.trainable_layers) == (
        (True, 4) if size in ("l", "x") else (False, 5)
    )


def test_the_validation_loss_of_evaluation_outputs_is_their_class_and_box_losses():
    from detr_backbone.detection.dfine.criterion import dfine_criterion
    from detr_backbone.detection.realtime import varifocal_criterion

    model = small_dfine().eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)])
    losses = dfine_criterion(DFineConfig(**SMALL), 3)(out, TARGETS)
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou", "class_error"}
    expected = varifocal_criterion(DFineConfig(**SMALL), 3)(out, TARGETS)
    for name in losses:
        torch.testing.assert_close(losses[name], expected[name])


@pytest.mark.parametrize(
    "size, lr, lr_backbone, epochs, flat, decay_end, mosaic, stop",
    [
        ("l", 5e-4, 2.5e-5, 58, 0.5, 0.862, None, None),
        pytest.param("s", 4e-4, 2e-4, 132, 0.485, 0.909, [0.0303, 0.485], 0.909, marks=pytest.mark.slow),
    ],
)
def test_deims_recipes_compose(size, lr, lr_backbone, epochs, flat, decay_end, mosaic, stop):
    from .jobs import compose_config

    cfg = compose_config(f"experiment=deim_dfine_hgnetv2_{size}_coco")
    assert (cfg.model._target_, cfg.model.class_loss, cfg.model.mal_gamma, cfg.model.mal_alpha) == (
        DFineConfig._target_,
        "mal",
        1.5,
        None,
    )
    assert (cfg.model.activation, cfg.model.mlp_activation) == ("silu", "silu")
    assert (cfg.lr, cfg.lr_backbone, cfg.trainer.max_epochs) == (lr, lr_backbone, epochs)
    schedule = cfg.optimizer
    assert (schedule.schedule, schedule.warmup_steps, schedule.flat_fraction, schedule.decay_end) == (
        "flat_cosine",
        2000,
        flat,
        decay_end,
    )
    assert (schedule.min_lr_ratio, schedule.warmup_power) == (0.5, 2.0)
    assert (cfg.data.augment, cfg.data.mosaic_phase, cfg.data.augment_stop) == ("deim", mosaic, stop)
    # DEIM trains the whole backbone with live BatchNorm (D-FINE-L froze its stem and norms)
    assert (cfg.backbone.trainable_layers, cfg.backbone.freeze_norm) == (5, False)
