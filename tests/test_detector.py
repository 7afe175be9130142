"""The DETR head: checkpoint layout, transformer math, matching, losses and post-processing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from detr_backbone import build_backbone, nested_tensor_from_tensor_list
from detr_backbone.detection import DETR, MLP, HungarianMatcher, PostProcess, SetCriterion
from detr_backbone.detection.detr.transformer import (
    Transformer,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    build_transformer,
)

D_MODEL = 32


def small_joiner():
    return build_backbone(
        {"backbone": {"kind": "torchvision", "name": "resnet18"}, "hidden_dim": D_MODEL, "lr_backbone": 1e-5}
    )


def small_transformer(**kwargs) -> Transformer:
    options = {"d_model": D_MODEL, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 2, "dim_feedforward": 64}
    return Transformer(**{**options, **kwargs}).eval()


@pytest.fixture(scope="module")
def small_detr() -> DETR:
    torch.manual_seed(0)
    return DETR(small_joiner(), small_transformer(return_intermediate_dec=True), num_classes=5, num_queries=7).eval()


def log_probs(*probabilities: float) -> list[float]:
    """Logits whose softmax is exactly ``probabilities`` (they sum to 1)."""
    return [math.log(p) for p in probabilities]


def target(labels, boxes) -> dict[str, torch.Tensor]:
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "image_id": torch.tensor(0),
        "orig_size": torch.tensor([64, 96]),
        "size": torch.tensor([64, 96]),
    }


# --- checkpoint layout ----------------------------------------------------------------------------


def detr_head_keys(d: int = 256, ffn: int = 2048, layers: int = 6, num_classes: int = 91, queries: int = 100) -> dict:
    """DETR's non-backbone state dict keys and shapes, in DETR's order (its optimizer states follow it)."""
    attention = {
        "in_proj_weight": (3 * d, d),
        "in_proj_bias": (3 * d,),
        "out_proj.weight": (d, d),
        "out_proj.bias": (d,),
    }
    feedforward = {"linear1.weight": (ffn, d), "linear1.bias": (ffn,), "linear2.weight": (d, ffn), "linear2.bias": (d,)}
    norm = {"weight": (d,), "bias": (d,)}
    encoder_layer = {
        **{f"self_attn.{k}": s for k, s in attention.items()},
        **feedforward,
        **{f"norm1.{k}": s for k, s in norm.items()},
        **{f"norm2.{k}": s for k, s in norm.items()},
    }
    decoder_layer = {
        **{f"self_attn.{k}": s for k, s in attention.items()},
        **{f"multihead_attn.{k}": s for k, s in attention.items()},
        **feedforward,
        **{f"norm1.{k}": s for k, s in norm.items()},
        **{f"norm2.{k}": s for k, s in norm.items()},
        **{f"norm3.{k}": s for k, s in norm.items()},
    }
    keys = {}
    for i in range(layers):
        keys.update({f"transformer.encoder.layers.{i}.{k}": s for k, s in encoder_layer.items()})
    for i in range(layers):
        keys.update({f"transformer.decoder.layers.{i}.{k}": s for k, s in decoder_layer.items()})
    keys.update({"transformer.decoder.norm.weight": (d,), "transformer.decoder.norm.bias": (d,)})
    keys.update({"class_embed.weight": (num_classes + 1, d), "class_embed.bias": (num_classes + 1,)})
    keys.update({"bbox_embed.layers.0.weight": (d, d), "bbox_embed.layers.0.bias": (d,)})
    keys.update({"bbox_embed.layers.1.weight": (d, d), "bbox_embed.layers.1.bias": (d,)})
    keys.update({"bbox_embed.layers.2.weight": (4, d), "bbox_embed.layers.2.bias": (4,)})
    keys.update({"query_embed.weight": (queries, d)})
    keys.update({"input_proj.weight": (d, 2048, 1, 1), "input_proj.bias": (d,)})
    return keys


def test_detr_checkpoint_layout_loads_strictly():
    joiner = build_backbone(
        {"backbone": {"kind": "torchvision", "name": "resnet50"}, "hidden_dim": 256, "lr_backbone": 1e-5}
    )
    model = DETR(joiner, Transformer(256, 8, 6, 6, 2048, return_intermediate_dec=True), num_classes=91, num_queries=100)
    backbone = {f"backbone.{k}": tuple(v.shape) for k, v in joiner.state_dict().items()}
    assert len(backbone) == 265 and all(k.startswith("backbone.0.body.") for k in backbone)
    assert not any("num_batches_tracked" in k or ".fc." in k for k in backbone)
    head = detr_head_keys()
    assert len(head) == 12 * 6 + 18 * 6 + 2 + 11

    own = model.state_dict()
    assert set(own) == set(head) | set(backbone)
    assert [k for k in own if not k.startswith("backbone.")] == list(head)  # DETR's order, too
    assert {k: tuple(own[k].shape) for k in head} == head

    torch.manual_seed(1)
    checkpoint = {k: torch.randn(shape) for k, shape in {**head, **backbone}.items()}
    model.load_state_dict(checkpoint, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in checkpoint.items())


def test_transformer_tree_post_norm_and_pre_norm():
    post, pre = small_transformer(), small_transformer(normalize_before=True)
    assert post.encoder.norm is None and isinstance(pre.encoder.norm, nn.LayerNorm)
    assert isinstance(post.decoder.norm, nn.LayerNorm) and isinstance(pre.decoder.norm, nn.LayerNorm)
    assert [name for name, _ in post.decoder.layers[0].named_children()] == [
        "self_attn",
        "multihead_attn",
        "linear1",
        "dropout",
        "linear2",
        "norm1",
        "norm2",
        "norm3",
        "dropout1",
        "dropout2",
        "dropout3",
    ]
    assert isinstance(build_transformer(64, 4, 1, 1, 128, 0.0), Transformer)


def test_matrices_are_xavier_uniform():
    transformer = small_transformer()
    weight = transformer.encoder.layers[0].self_attn.in_proj_weight  # (3d, d)
    bound = math.sqrt(6 / (3 * D_MODEL + D_MODEL))
    assert 0.9 * bound < weight.abs().max() <= bound
    ffn = transformer.decoder.layers[1].linear1.weight  # (64, d): default init would bound it by 1/sqrt(d)
    assert 0.9 * math.sqrt(6 / (64 + D_MODEL)) < ffn.abs().max() <= math.sqrt(6 / (64 + D_MODEL))


# --- transformer math -----------------------------------------------------------------------------


def test_encoder_layer_adds_position_to_queries_and_keys_not_values():
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(D_MODEL, 2, 64, dropout=0.0).eval()
    src, pos = torch.randn(6, 2, D_MODEL), torch.randn(6, 2, D_MODEL)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    attended = layer.self_attn(src + pos, src + pos, src, key_padding_mask=padding)[0]
    hidden = layer.norm1(src + attended)
    expected = layer.norm2(hidden + layer.linear2(F.relu(layer.linear1(hidden))))
    torch.testing.assert_close(layer(src, src_key_padding_mask=padding, pos=pos), expected)


def test_decoder_layer_uses_query_pos_and_memory_pos_like_detr():
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(D_MODEL, 2, 64, dropout=0.0).eval()
    tgt, query_pos = torch.randn(3, 2, D_MODEL), torch.randn(3, 2, D_MODEL)
    memory, pos = torch.randn(6, 2, D_MODEL), torch.randn(6, 2, D_MODEL)
    x = layer.norm1(tgt + layer.self_attn(tgt + query_pos, tgt + query_pos, tgt)[0])
    x = layer.norm2(x + layer.multihead_attn(x + query_pos, memory + pos, memory)[0])
    expected = layer.norm3(x + layer.linear2(F.relu(layer.linear1(x))))
    torch.testing.assert_close(layer(tgt, memory, pos=pos, query_pos=query_pos), expected)


def transformer_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    src = torch.randn(2, D_MODEL, 3, 5, generator=generator)
    pos = torch.randn(2, D_MODEL, 3, 5, generator=generator)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, :, 3:] = True
    mask[1, 2, :] = True
    return src, mask, torch.randn(7, D_MODEL, generator=generator), pos


def test_transformer_shapes():
    src, mask, queries, pos = transformer_inputs()
    hs, memory = small_transformer(return_intermediate_dec=True)(src, mask, queries, pos)
    assert hs.shape == (2, 2, 7, D_MODEL) and memory.shape == src.shape
    hs_last, _ = small_transformer()(src, mask, queries, pos)
    assert hs_last.shape == (1, 2, 7, D_MODEL)


def test_positional_maps_reach_encoder_and_cross_attention():
    torch.manual_seed(0)
    src, mask, queries, pos = transformer_inputs()
    other_pos = torch.randn_like(pos)
    transformer = small_transformer()
    with torch.no_grad():
        hs, memory = transformer(src, mask, queries, pos)
        hs_other, memory_other = transformer(src, mask, queries, other_pos)
    assert not torch.allclose(memory, memory_other, atol=1e-3) and not torch.allclose(hs, hs_other, atol=1e-3)

    # without encoder layers the memory is the input itself; the decoder still sees pos through its keys
    no_encoder = small_transformer(num_encoder_layers=0)
    with torch.no_grad():
        hs, memory = no_encoder(src, mask, queries, pos)
        hs_other, memory_other = no_encoder(src, mask, queries, other_pos)
    assert torch.equal(memory, src) and torch.equal(memory_other, src)
    assert not torch.allclose(hs, hs_other, atol=1e-3)


def test_padding_mask_hides_padded_positions():
    src, mask, queries, pos = transformer_inputs()
    changed_src, changed_pos = src.clone(), pos.clone()
    padded = mask[:, None].expand_as(src)
    changed_src[padded] = torch.randn(int(padded.sum())) * 10
    changed_pos[padded] = torch.randn(int(padded.sum())) * 10
    transformer = small_transformer(return_intermediate_dec=True)
    with torch.no_grad():
        hs, memory = transformer(src, mask, queries, pos)
        hs_changed, memory_changed = transformer(changed_src, mask, queries, changed_pos)
    valid = ~padded
    torch.testing.assert_close(memory_changed[valid], memory[valid])
    torch.testing.assert_close(hs_changed, hs)
    assert not torch.allclose(memory_changed[padded], memory[padded])  # the change did happen


# --- the detector ---------------------------------------------------------------------------------


def test_mlp_has_relu_between_layers_only():
    torch.manual_seed(0)
    mlp = MLP(4, 8, 2, 3)
    assert [tuple(layer.weight.shape) for layer in mlp.layers] == [(8, 4), (8, 8), (2, 8)]
    x = torch.randn(5, 4)
    first, second, last = mlp.layers
    torch.testing.assert_close(mlp(x), last(F.relu(second(F.relu(first(x))))))


def test_detr_outputs(small_detr):
    images = [torch.randn(3, 64, 96), torch.randn(3, 48, 80)]
    with torch.no_grad():
        out = small_detr(images)
        again = small_detr(nested_tensor_from_tensor_list(images))
    assert out["pred_logits"].shape == (2, 7, 6) and out["pred_boxes"].shape == (2, 7, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == 2 - 1
    assert out["aux_outputs"][0]["pred_logits"].shape == (2, 7, 6) and out["aux_outputs"][0]["pred_boxes"].shape == (
        2,
        7,
        4,
    )
    torch.testing.assert_close(again["pred_logits"], out["pred_logits"])
    assert small_detr.input_proj.in_channels == 512 and small_detr.input_proj.kernel_size == (1, 1)


def test_aux_loss_needs_every_decoder_layer():
    with pytest.raises(ValueError, match="return_intermediate_dec=True"):
        DETR(small_joiner(), small_transformer(), num_classes=5, num_queries=7)
    model = DETR(small_joiner(), small_transformer(), num_classes=5, num_queries=7, aux_loss=False).eval()
    with torch.no_grad():
        assert set(model([torch.randn(3, 64, 64)])) == {"pred_logits", "pred_boxes"}


# --- matching -------------------------------------------------------------------------------------


def two_by_two():
    outputs = {
        "pred_logits": torch.tensor([[log_probs(0.2, 0.7, 0.1), log_probs(0.6, 0.3, 0.1)]]),
        "pred_boxes": torch.tensor([[[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]]]),
    }
    targets = [target([0, 1], [[0.7, 0.75, 0.2, 0.3], [0.25, 0.3, 0.2, 0.2]])]
    return outputs, targets


def test_matcher_cost_entries_by_hand():
    outputs, targets = two_by_two()
    cost = HungarianMatcher().cost_matrix(
        outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"]
    )
    # query 0 (0.15, 0.15, 0.35, 0.35) vs target 1 (0.15, 0.2, 0.35, 0.4): L1 0.05, p(class 1) 0.7,
    # intersection 0.2 x 0.15 = 0.03, union 0.05, IoU 0.6, enclosing box 0.2 x 0.25 = union, GIoU 0.6
    assert cost[0, 1].item() == pytest.approx(5 * 0.05 - 1 * 0.7 - 2 * 0.6, abs=1e-5)
    # query 1 (0.65, 0.65, 0.85, 0.85) vs target 1: L1 0.5 + 0.45, p(class 1) 0.3,
    # disjoint: union 0.08, enclosing box 0.7 x 0.65 = 0.455, GIoU -(0.455 - 0.08) / 0.455
    assert cost[1, 1].item() == pytest.approx(5 * 0.95 - 1 * 0.3 + 2 * (0.375 / 0.455), abs=1e-5)


def test_matcher_finds_the_swap_and_handles_empty_targets():
    outputs, targets = two_by_two()
    outputs = {k: torch.cat([v, v]) for k, v in outputs.items()}
    targets.append(target([], []))
    (queries, objects), (no_queries, no_objects) = HungarianMatcher()(outputs, targets)
    assert queries.tolist() == [0, 1] and objects.tolist() == [1, 0]
    assert queries.dtype == objects.dtype == torch.int64
    assert no_queries.shape == no_objects.shape == (0,) and no_queries.dtype == torch.int64


def test_batched_matching_equals_matching_each_image_alone():
    torch.manual_seed(0)
    counts = [3, 0, 1, 5]
    outputs = {"pred_logits": torch.randn(4, 6, 4), "pred_boxes": torch.rand(4, 6, 4) * 0.5 + 0.25}
    targets = [target(torch.randint(3, (n,)).tolist(), (torch.rand(n, 4) * 0.5 + 0.25).tolist()) for n in counts]
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for image, (queries, objects) in enumerate(batched):
        alone = matcher.cost_matrix(
            outputs["pred_logits"][image],
            outputs["pred_boxes"][image],
            targets[image]["labels"],
            targets[image]["boxes"],
        )
        expected_queries, expected_objects = linear_sum_assignment(alone.numpy())
        assert queries.tolist() == expected_queries.tolist() and objects.tolist() == expected_objects.tolist()
        assert len(queries) == counts[image]


def test_matcher_rejects_a_target_count_unlike_the_batch():
    outputs, targets = two_by_two()
    with pytest.raises(ValueError, match="the matcher got 2 targets for a batch of 1 images"):
        HungarianMatcher()(outputs, targets + targets)


def test_matcher_rejects_all_zero_costs():
    with pytest.raises(ValueError, match="all matching costs are 0"):
        HungarianMatcher(0, 0, 0)


# --- losses ---------------------------------------------------------------------------------------

# one image, two queries, one target (class 1): query 0 matches it, query 1 must say "no object"
LOGITS = [log_probs(0.2, 0.7, 0.1), log_probs(0.1, 0.1, 0.8)]
BOXES = [[0.55, 0.5, 0.4, 0.3], [0.2, 0.2, 0.1, 0.1]]
TARGET_BOX = [0.5, 0.5, 0.4, 0.4]
# weighted mean: PyTorch divides by the summed weights of the targets (1 for class 1, eos 0.1)
EXPECTED_CE = (-math.log(0.7) + 0.1 * -math.log(0.8)) / (1 + 0.1)
EXPECTED_L1 = 0.05 + 0 + 0 + 0.1
# query 0 (0.35, 0.35, 0.75, 0.65) vs target (0.3, 0.3, 0.7, 0.7): intersection 0.35 x 0.3,
# union 0.12 + 0.16 - 0.105, enclosing box 0.45 x 0.4
EXPECTED_GIOU = 1 - (0.105 / 0.175 - (0.18 - 0.175) / 0.18)


def predictions(dtype=torch.float32, requires_grad=False):
    logits = torch.tensor([LOGITS], dtype=dtype, requires_grad=requires_grad)
    boxes = torch.tensor([BOXES], dtype=dtype, requires_grad=requires_grad)
    return logits, boxes


def test_criterion_matches_hand_computation():
    logits, boxes = predictions()
    outputs = {
        "pred_logits": logits,
        "pred_boxes": boxes,
        "aux_outputs": [{"pred_logits": logits, "pred_boxes": boxes}],
    }
    criterion = SetCriterion(num_classes=2, matcher=HungarianMatcher())
    losses = criterion(outputs, [target([1], [TARGET_BOX])])
    assert set(losses) == {
        "loss_ce",
        "loss_bbox",
        "loss_giou",
        "class_error",
        "loss_ce_0",
        "loss_bbox_0",
        "loss_giou_0",
    }
    assert losses["loss_ce"].item() == pytest.approx(EXPECTED_CE, abs=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(EXPECTED_L1, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(EXPECTED_GIOU, abs=1e-6)
    assert losses["class_error"].item() == 0
    assert criterion.empty_weight.tolist() == pytest.approx([1, 1, 0.1])
    one_layer = 1 * EXPECTED_CE + 5 * EXPECTED_L1 + 2 * EXPECTED_GIOU
    assert criterion.weighted_total(losses).item() == pytest.approx(2 * one_layer, abs=1e-5)


def test_criterion_normalises_by_the_reduced_box_count_and_handles_empty_images():
    logits, boxes = predictions()
    outputs = {"pred_logits": logits.repeat(2, 1, 1), "pred_boxes": boxes.repeat(2, 1, 1)}
    targets = [target([1], [TARGET_BOX]), target([], [])]
    averaged = SetCriterion(2, HungarianMatcher(), num_boxes_reduce=lambda n: n * 2)(outputs, targets)
    assert averaged["loss_bbox"].item() == pytest.approx(EXPECTED_L1 / 2, abs=1e-6)
    # the empty image adds two "no object" queries to the weighted mean
    expected_ce = (-math.log(0.7) + 0.1 * -math.log(0.8) + 0.1 * -math.log(0.1) + 0.1 * -math.log(0.8)) / (1 + 0.3)
    assert averaged["loss_ce"].item() == pytest.approx(expected_ce, abs=1e-6)
    nothing = SetCriterion(2, HungarianMatcher())(outputs, [target([], []), target([], [])])
    assert nothing["loss_bbox"].item() == 0 and nothing["loss_giou"].item() == 0  # divided by max(0, 1)


def test_criterion_computes_in_float32_and_backpropagates_to_bfloat16_predictions():
    logits, boxes = predictions(torch.bfloat16, requires_grad=True)
    criterion = SetCriterion(2, HungarianMatcher())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, [target([1], [TARGET_BOX])])
    assert all(value.dtype == torch.float32 for value in losses.values())
    criterion.weighted_total(losses).backward()
    assert logits.grad.dtype == boxes.grad.dtype == torch.bfloat16
    assert logits.grad.abs().sum() > 0 and boxes.grad[0, 0].abs().sum() > 0
    assert boxes.grad[0, 1].abs().sum() == 0  # an unmatched query's box gets no box loss


def test_criterion_rejects_unknown_loss_weights():
    with pytest.raises(ValueError, match="loss_weights"):
        SetCriterion(2, HungarianMatcher(), loss_weights={"loss_l1": 5})


# --- post-processing ------------------------------------------------------------------------------


def test_postprocess_scales_boxes_and_excludes_no_object():
    outputs = {
        "pred_logits": torch.tensor([[log_probs(0.2, 0.7, 0.1), log_probs(0.15, 0.05, 0.8)]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.4, 0.2], [0.25, 0.75, 0.5, 0.5]]]),
    }
    (result,) = PostProcess()(outputs, torch.tensor([[100, 200]]))  # (h, w)
    torch.testing.assert_close(result["scores"], torch.tensor([0.7, 0.15]))
    assert result["labels"].tolist() == [1, 0]  # query 1's "no object" (0.8) is never a label
    # (cx, cy, w, h) -> (x0, y0, x1, y1), x scaled by w = 200, y by h = 100
    torch.testing.assert_close(result["boxes"], torch.tensor([[60.0, 40.0, 140.0, 60.0], [0.0, 50.0, 100.0, 100.0]]))
