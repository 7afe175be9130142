"""Deformable DETR: deformable attention against bilinear sampling by hand, the checkpoint layout,
focal matching and loss, top-k post-processing, and training steps in float32 and bfloat16."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from detr_backbone import build_backbone, nested_tensor_from_tensor_list
from detr_backbone.detection import DETR, MLP, HungarianMatcher, PostProcess
from detr_backbone.detection.boxes import per_image
from detr_backbone.detection.deformable import (
    DeformableDETR,
    DeformableDetrConfig,
    DeformableTransformer,
    FocalHungarianMatcher,
    FocalSetCriterion,
    MSDeformAttn,
    TopKPostProcess,
    multi_scale_deformable_attention,
    topk_detections,
)
from detr_backbone.detection.detr import softmax_detections
from detr_backbone.detection.detr.transformer import Transformer
from detr_backbone.detection.multiscale.criterion import focal_criterion
from detr_backbone.detection.multiscale.levels import encoder_reference_points, valid_ratios
from detr_backbone.detection.multiscale.proposals import encoder_proposals, proposal_position_embedding
from detr_backbone.detection.multiscale.refinement import offset_reference

D = 32
OPTIONS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
}
SMALL = {
    "num_queries": 10,
    "enc_layers": 2,
    "dec_layers": 2,
    "nheads": 4,
    "dim_feedforward": 64,
    "enc_n_points": 2,
    "dec_n_points": 3,
}


def deformable_detr(joiner, num_classes: int, **fields):
    """A Deformable DETR of the schema's fields around a built Joiner ``D`` channels wide."""
    return DeformableDetrConfig(**fields).build(joiner, num_classes, D)


def small_joiner(**backbone):
    """The brief's tiny Joiner: GroupNorm ResNet-18, every level returned (strides 4..32), Deformable's sine."""
    options = {"kind": "groupnorm", "name": "resnet18", "return_interm_layers": True, "trainable_layers": 5, **backbone}
    return build_backbone(
        {"backbone": options, "position": {"kind": "sine", "offset": -0.5}, "hidden_dim": D, "lr_backbone": 1e-4}
    )


@pytest.fixture(scope="module")
def joiner():
    torch.manual_seed(0)
    return small_joiner()


# --- multi-scale deformable attention -------------------------------------------------------------


def bilinear(level_map: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """level_map (h, w, D) read at (x, y) in [0, 1] of the map, pixel centres at (i + 0.5) / size,
    the four neighbours weighted by their opposite areas, zero outside the map."""
    height, width = level_map.shape[:2]
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px.item()), math.floor(py.item())
    fx, fy = px - x0, py - y0
    total = level_map.new_zeros(level_map.shape[-1])
    corners = (
        (x0, y0, (1 - fx) * (1 - fy)),
        (x0 + 1, y0, fx * (1 - fy)),
        (x0, y0 + 1, (1 - fx) * fy),
        (x0 + 1, y0 + 1, fx * fy),
    )
    for cx, cy, weight in corners:
        if 0 <= cx < width and 0 <= cy < height:
            total = total + weight * level_map[cy, cx]
    return total


def attention_by_hand(value, shapes, locations, weights):
    """Sum over levels and points of weight * bilinear sample, for each image, query and head."""
    batch, _, heads, channels = value.shape
    queries = locations.shape[1]
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    rows = []
    for n in range(batch):
        for q in range(queries):
            per_head = []
            for m in range(heads):
                total = value.new_zeros(channels)
                for level, (h, w) in enumerate(shapes):
                    level_map = value[n, starts[level] : starts[level + 1], m].view(h, w, channels)
                    for p in range(locations.shape[4]):
                        x, y = locations[n, q, m, level, p]
                        total = total + weights[n, q, m, level, p] * bilinear(level_map, x, y)
                per_head.append(total)
            rows.append(torch.cat(per_head))
    return torch.stack(rows).view(batch, queries, heads * channels)


@pytest.mark.parametrize("impl", ["grid_sample", "gather"])
def test_sampling_equals_bilinear_interpolation_by_hand_with_gradients(impl):
    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    value = torch.randn(2, 26, 2, 3, dtype=torch.float64)
    value[1, 3:5] = 0.0  # padded positions arrive zeroed (MSDeformAttn does it)
    locations = torch.rand(2, 3, 2, 2, 2, 2, dtype=torch.float64) * 1.2 - 0.1  # some points outside the map
    weights = torch.rand(2, 3, 2, 2, 2, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    expected_inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    output = multi_scale_deformable_attention(inputs[0], shapes, inputs[1], inputs[2], impl)
    expected = attention_by_hand(expected_inputs[0], shapes, expected_inputs[1], expected_inputs[2])
    torch.testing.assert_close(output, expected)
    upstream = torch.randn_like(output)
    (output * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for name, got, want in zip(("value", "locations", "weights"), inputs, expected_inputs):
        torch.testing.assert_close(got.grad, want.grad, msg=lambda m, name=name: f"gradient w.r.t. {name}: {m}")
    assert inputs[1].grad.abs().sum() > 0 and inputs[0].grad[1, 3:5].abs().sum() > 0


@pytest.mark.parametrize("impl", ["grid_sample", "gather"])
def test_sampling_in_half_precision_runs_in_float32_and_casts_back(impl):
    torch.manual_seed(0)
    shapes = [(6, 7), (3, 4)]
    value = torch.randn(1, 54, 2, 4)
    locations, weights = torch.rand(1, 5, 2, 2, 3, 2), torch.rand(1, 5, 2, 2, 3)
    for dtype in (torch.bfloat16, torch.float16):
        low = [t.to(dtype) for t in (value, locations, weights)]
        output = multi_scale_deformable_attention(low[0], shapes, low[1], low[2], impl)
        in_float32 = multi_scale_deformable_attention(low[0].float(), shapes, low[1].float(), low[2].float(), impl)
        assert output.dtype == dtype and torch.equal(output, in_float32.to(dtype))
        # autocast's case: a half-precision value map read at float32 locations
        mixed = multi_scale_deformable_attention(low[0], shapes, locations, weights, impl)
        reference = multi_scale_deformable_attention(low[0].float(), shapes, locations, weights, impl)
        assert mixed.dtype == dtype and torch.equal(mixed, reference.to(dtype))
    with pytest.raises(ValueError, match="must list the 2 levels"):
        multi_scale_deformable_attention(value, [(6, 7)], locations, weights, impl)


def test_msdeformattn_places_points_and_boxes_and_ignores_padding():
    torch.manual_seed(0)
    attention = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
    for linear in (attention.sampling_offsets, attention.attention_weights):
        nn.init.normal_(linear.weight, std=0.5)  # away from the initial pattern, so that queries differ
    shapes = [(5, 6), (3, 3)]
    query, memory = torch.randn(2, 4, 16), torch.randn(2, 39, 16)
    padding = torch.zeros(2, 39, dtype=torch.bool)
    padding[1, 4:6] = padding[1, 10:12] = padding[1, 36:] = True
    value = attention.value_proj(memory).masked_fill(padding[..., None], 0).view(2, 39, 2, 8)
    offsets = attention.sampling_offsets(query).view(2, 4, 2, 2, 3, 2)
    weights = attention.attention_weights(query).view(2, 4, 2, 6).softmax(-1).view(2, 4, 2, 2, 3)
    # a point moves by offset / (w, h) of the level; a box by offset / n_points * half its size
    points = torch.rand(2, 4, 2, 2)
    boxes = torch.cat([torch.rand(2, 4, 2, 2), torch.rand(2, 4, 2, 2) * 0.5], -1)
    sizes = torch.tensor([[6.0, 5.0], [3.0, 3.0]])
    point_locations = points[:, :, None, :, None, :] + offsets / sizes[None, None, None, :, None, :]
    box_locations = boxes[:, :, None, :, None, :2] + offsets / 3 * boxes[:, :, None, :, None, 2:] * 0.5
    for reference, locations in ((points, point_locations), (boxes, box_locations)):
        expected = attention.output_proj(attention_by_hand(value, shapes, locations, weights))
        torch.testing.assert_close(attention(query, reference, memory, shapes, padding), expected)
    changed = memory.clone()
    changed[padding] = torch.randn(int(padding.sum()), 16) * 100
    unchanged = attention(query, boxes, memory, shapes, padding)
    torch.testing.assert_close(attention(query, boxes, changed, shapes, padding), unchanged)
    with pytest.raises(ValueError, match="must end in 2"):
        attention(query, torch.rand(2, 4, 2, 3), memory, shapes, padding)


def test_msdeformattn_initial_pattern():
    attention = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2)
    bias = attention.sampling_offsets.bias.view(4, 3, 2, 2)
    # head h points along angle h * pi / 2, scaled onto the unit square's border; point i steps i + 1 out
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for level in range(3):
        torch.testing.assert_close(bias[:, level, 0], directions, atol=1e-6, rtol=0)
        torch.testing.assert_close(bias[:, level, 1], 2 * directions, atol=1e-6, rtol=0)
    diagonal = MSDeformAttn(d_model=16, n_levels=1, n_heads=8, n_points=1).sampling_offsets.bias.view(8, 2)
    torch.testing.assert_close(diagonal[1], torch.tensor([1.0, 1.0]))  # 45 degrees lands on the corner
    assert not attention.sampling_offsets.weight.any() and not attention.attention_weights.weight.any()
    assert not attention.attention_weights.bias.any() and not attention.value_proj.bias.any()


# --- checkpoint layout ----------------------------------------------------------------------------


def deformable_head_keys(
    d: int,
    ffn: int,
    layers: int,
    heads: int,
    levels: int,
    enc_points: int,
    dec_points: int,
    num_classes: int,
    queries: int,
    backbone_channels: list[int],
    with_box_refine: bool,
    two_stage: bool,
) -> dict:
    """Deformable-DETR's non-backbone state dict keys and shapes, in its order (written from its modules)."""

    def sampling(points: int) -> dict:
        offsets, weights = heads * levels * points * 2, heads * levels * points
        return {
            "sampling_offsets.weight": (offsets, d),
            "sampling_offsets.bias": (offsets,),
            "attention_weights.weight": (weights, d),
            "attention_weights.bias": (weights,),
            "value_proj.weight": (d, d),
            "value_proj.bias": (d,),
            "output_proj.weight": (d, d),
            "output_proj.bias": (d,),
        }

    def norm(name: str, width: int = d) -> dict:
        return {f"{name}.weight": (width,), f"{name}.bias": (width,)}

    def linear(name: str, n_out: int, n_in: int) -> dict:
        return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}

    def under(prefix: str, keys: dict) -> dict:
        return {f"{prefix}.{k}": s for k, s in keys.items()}

    feedforward = {**linear("linear1", ffn, d), **linear("linear2", d, ffn)}
    encoder_layer = {**under("self_attn", sampling(enc_points)), **norm("norm1"), **feedforward, **norm("norm2")}
    multihead = {
        "in_proj_weight": (3 * d, d),
        "in_proj_bias": (3 * d,),
        "out_proj.weight": (d, d),
        "out_proj.bias": (d,),
    }
    decoder_layer = {
        **under("cross_attn", sampling(dec_points)),
        **norm("norm1"),
        **under("self_attn", multihead),
        **norm("norm2"),
        **feedforward,
        **norm("norm3"),
    }
    class_head = linear("", num_classes, d)
    box_head = {**linear("layers.0", d, d), **linear("layers.1", d, d), **linear("layers.2", 4, d)}
    num_pred = layers + 1 if two_stage else layers
    class_heads = {f"{i}{k}": s for i in range(num_pred) for k, s in class_head.items()}
    box_heads = {k: s for i in range(num_pred) for k, s in under(str(i), box_head).items()}

    keys = {"transformer.level_embed": (levels, d)}
    for i in range(layers):
        keys.update(under(f"transformer.encoder.layers.{i}", encoder_layer))
    for i in range(layers):
        keys.update(under(f"transformer.decoder.layers.{i}", decoder_layer))
    if with_box_refine:
        keys.update(under("transformer.decoder.bbox_embed", box_heads))
    if two_stage:
        keys.update({f"transformer.decoder.class_embed.{k}": s for k, s in class_heads.items()})
        keys.update(under("transformer", {**linear("enc_output", d, d), **norm("enc_output_norm")}))
        keys.update(under("transformer", {**linear("pos_trans", 2 * d, 2 * d), **norm("pos_trans_norm", 2 * d)}))
    else:
        keys.update(under("transformer", linear("reference_points", 2, d)))
    keys.update({f"class_embed.{k}": s for k, s in class_heads.items()})
    keys.update(under("bbox_embed", box_heads))
    if not two_stage:
        keys["query_embed.weight"] = (queries, 2 * d)
    in_channels = [*backbone_channels, backbone_channels[-1]] + [d] * (levels - len(backbone_channels) - 1)
    for level, channels in enumerate(in_channels[:levels]):
        kernel = 1 if level < len(backbone_channels) else 3
        keys.update({f"input_proj.{level}.0.weight": (d, channels, kernel, kernel), f"input_proj.{level}.0.bias": (d,)})
        keys.update(norm(f"input_proj.{level}.1"))
    return keys


@pytest.mark.parametrize("option", list(OPTIONS))
def test_deformable_checkpoint_layout_loads_strictly(option):
    # layers 2-4 and one extra level: the official checkpoints' structure, at hidden 32 and two layers
    deformable_joiner = small_joiner(return_interm_layers=False, levels=[2, 3, 4])
    options = OPTIONS[option]
    model = deformable_detr(deformable_joiner, 7, **{**SMALL, "dec_layers": 2}, num_feature_levels=4, **options)
    flags = {"with_box_refine": False, "two_stage": False, **options}
    head = deformable_head_keys(D, 64, 2, 4, 4, 2, 3, 7, 10, [128, 256, 512], **flags)
    backbone = {f"backbone.{k}": tuple(v.shape) for k, v in deformable_joiner.state_dict().items()}
    own = model.state_dict()
    assert [k for k in own if not k.startswith("backbone.")] == list(head)  # Deformable-DETR's order, too
    assert {k: tuple(own[k].shape) for k in head} == head and set(own) == set(head) | set(backbone)

    torch.manual_seed(1)
    checkpoint = {k: torch.randn(shape) for k, shape in {**head, **backbone}.items()}
    # a module reachable by several names holds the same tensors under each, as in the published files:
    # the shared head without refinement, and the decoder's heads, which are the detector's
    for key in checkpoint:
        if not options.get("with_box_refine") and key.startswith(("class_embed.", "bbox_embed.")):
            head, _, rest = key.split(".", 2)
            checkpoint[key] = checkpoint[f"{head}.0.{rest}"]
        if key.startswith("transformer.decoder.") and "_embed." in key:
            checkpoint[key] = checkpoint[key.removeprefix("transformer.decoder.")]
    model.load_state_dict(checkpoint, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in checkpoint.items())


def test_heads_are_shared_without_refinement_and_copies_with_it(joiner):
    plain = deformable_detr(joiner, 3, **SMALL, num_feature_levels=5)
    refine = deformable_detr(joiner, 3, **SMALL, num_feature_levels=5, with_box_refine=True)
    two_stage = deformable_detr(joiner, 3, **SMALL, num_feature_levels=5, with_box_refine=True, two_stage=True)
    assert plain.class_embed[0] is plain.class_embed[1] and plain.bbox_embed[0] is plain.bbox_embed[1]
    assert plain.transformer.decoder.bbox_embed is None and plain.transformer.decoder.class_embed is None
    assert refine.class_embed[0] is not refine.class_embed[1] and refine.bbox_embed[0] is not refine.bbox_embed[1]
    assert refine.transformer.decoder.bbox_embed is refine.bbox_embed and refine.transformer.decoder.class_embed is None
    assert len(two_stage.class_embed) == len(two_stage.bbox_embed) == 3  # + the proposals' heads
    assert two_stage.transformer.decoder.class_embed is two_stage.class_embed
    assert not hasattr(two_stage, "query_embed") and not hasattr(two_stage.transformer, "reference_points")

    prior = -math.log(99)
    for model in (plain, refine, two_stage):
        assert all(torch.allclose(head.bias, torch.full((3,), prior)) for head in model.class_embed)
        assert all(not head.layers[-1].weight.any() for head in model.bbox_embed)
    # box sizes start at sigmoid(-2) around a point reference; refined boxes and proposals already have one
    assert plain.bbox_embed[0].layers[-1].bias.tolist() == [0, 0, -2, -2]
    assert [head.layers[-1].bias.tolist() for head in refine.bbox_embed] == [[0, 0, -2, -2], [0, 0, 0, 0]]
    assert all(head.layers[-1].bias.tolist() == [0, 0, 0, 0] for head in two_stage.bbox_embed)
    # the first extra level reads the deepest backbone map, the next ones the previous extra level
    six = deformable_detr(joiner, 3, **SMALL, num_feature_levels=6)
    assert [p[0].in_channels for p in six.input_proj] == [64, 128, 256, 512, 512, D]
    assert [p[0].kernel_size for p in six.input_proj] == [(1, 1)] * 4 + [(3, 3)] * 2 and six.input_proj[5][
        0
    ].stride == (2, 2)
    assert all(isinstance(p[1], nn.GroupNorm) and p[1].num_groups == 32 for p in six.input_proj)
    seen = {}
    six.transformer.register_forward_hook(lambda module, args, output: seen.update(levels=args[:3]))
    with torch.no_grad():
        six(nested_tensor_from_tensor_list([torch.randn(3, 128, 128), torch.randn(3, 128, 64)]))
    srcs, masks, positions = seen["levels"]
    assert [tuple(src.shape[-2:]) for src in srcs] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert [tuple(p.shape) for p in positions] == [(2, D, *src.shape[-2:]) for src in srcs]
    # the extra levels' masks follow the image: image 1 is 64 wide, half of the 128 batch
    assert masks[4][1].tolist() == [[False, True], [False, True]] and not masks[5].any()


def test_linear_projection_parameters_are_the_sampling_offsets_and_reference_points(joiner):
    model = deformable_detr(joiner, 3, **SMALL, num_feature_levels=5)
    names = [name for name, _ in model.linear_projection_parameters()]
    attentions = ("encoder.layers.{}.self_attn", "decoder.layers.{}.cross_attn")
    sampling = [
        f"transformer.{attention.format(i)}.sampling_offsets.{kind}"
        for attention in attentions
        for i in range(2)
        for kind in ("weight", "bias")
    ]
    assert sorted(names) == sorted(
        [*sampling, "transformer.reference_points.weight", "transformer.reference_points.bias"]
    )


def test_options_are_checked(joiner):
    with pytest.raises(ValueError, match="model.two_stage=true needs model.with_box_refine=true"):
        deformable_detr(joiner, 3, **SMALL, num_feature_levels=5, two_stage=True)
    with pytest.raises(ValueError, match="num_feature_levels=3 is fewer than the Joiner's 4 levels"):
        deformable_detr(joiner, 3, **SMALL, num_feature_levels=3)
    transformer = DeformableTransformer(D, 4, 1, 1, 64, num_feature_levels=4, return_intermediate_dec=True)
    with pytest.raises(ValueError, match="num_feature_levels=5 but the transformer was built for 4"):
        DeformableDETR(joiner, transformer, 3, 10, 5)
    with pytest.raises(ValueError, match="two_stage reads the proposal heads"):
        two_stage = DeformableTransformer(
            D, 4, 1, 1, 64, num_feature_levels=1, two_stage=True, two_stage_num_proposals=4
        )
        two_stage([torch.randn(1, D, 3, 3)], [torch.zeros(1, 3, 3, dtype=torch.bool)], [torch.randn(1, D, 3, 3)])


# --- the transformer ------------------------------------------------------------------------------


@pytest.mark.parametrize("two_stage", [False, True], ids=["plain", "two_stage"])
def test_transformer_ignores_padded_content(two_stage):
    torch.manual_seed(0)
    transformer = DeformableTransformer(
        D,
        4,
        2,
        2,
        64,
        dropout=0.0,
        return_intermediate_dec=True,
        num_feature_levels=2,
        dec_n_points=2,
        enc_n_points=2,
        two_stage=two_stage,
        two_stage_num_proposals=5,
    ).eval()
    queries = None
    if two_stage:  # the proposal heads DeformableDETR would hand over (the third pair scores the proposals)
        transformer.decoder.class_embed = nn.ModuleList(nn.Linear(D, 3) for _ in range(3))
        transformer.decoder.bbox_embed = nn.ModuleList(MLP(D, D, 4, 3) for _ in range(3))
    else:
        queries = torch.randn(5, 2 * D)
    masks = [torch.zeros(2, 6, 8, dtype=torch.bool), torch.zeros(2, 3, 4, dtype=torch.bool)]
    masks[0][1, 4:], masks[0][1, :, 5:], masks[1][1, 2:], masks[1][1, :, 3:] = True, True, True, True
    srcs = [torch.randn(2, D, 6, 8), torch.randn(2, D, 3, 4)]
    pos = [torch.randn(2, D, 6, 8), torch.randn(2, D, 3, 4)]
    changed_srcs, changed_pos = [s.clone() for s in srcs], [p.clone() for p in pos]
    for tensors in (changed_srcs, changed_pos):
        for tensor, mask in zip(tensors, masks):
            padded = mask[:, None].expand_as(tensor)
            tensor[padded] = torch.randn(int(padded.sum())) * 10
    with torch.no_grad():
        out = transformer(srcs, masks, pos, queries)
        changed = transformer(changed_srcs, masks, changed_pos, queries)
    width = 4 if two_stage else 2
    assert out.hs.shape == (2, 2, 5, D) and out.init_reference.shape == (2, 5, width)
    assert out.inter_references.shape == (2, 2, 5, width)
    torch.testing.assert_close(changed.hs, out.hs)
    if two_stage:
        padding = torch.cat([mask.flatten(1) for mask in masks], 1)
        torch.testing.assert_close(changed.enc_outputs_class, out.enc_outputs_class)
        # padded positions propose nothing: their memory is zeroed, so all score alike, and their boxes sit at infinity
        assert torch.allclose(out.enc_outputs_class[padding], out.enc_outputs_class[padding][0])
        assert torch.isinf(out.enc_outputs_coord_unact[padding]).all()
        return
    # valid ratios: image 1 fills 5/8 x 4/6 of level 0 and 3/4 x 2/3 of level 1; references scale with them
    ratios = torch.tensor([[5 / 8, 4 / 6], [3 / 4, 2 / 3]])
    first_layer = transformer.decoder.layers[0].cross_attn
    seen = {}
    first_layer.register_forward_hook(lambda module, args, output: seen.update(reference=args[1]))
    with torch.no_grad():
        transformer(srcs, masks, pos, queries)
    torch.testing.assert_close(seen["reference"][1], out.init_reference[1][:, None] * ratios)


def test_valid_ratios_and_encoder_reference_points_by_hand():
    shapes = [(4, 6), (2, 3)]
    masks = [torch.zeros(2, 4, 6, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)]
    masks[0][1, 3:], masks[0][1, :, 4:], masks[1][1, :, 2:] = True, True, True
    ratios = torch.stack([valid_ratios(mask) for mask in masks], 1)
    torch.testing.assert_close(ratios[1], torch.tensor([[4 / 6, 3 / 4], [2 / 3, 1.0]]))
    points = encoder_reference_points(shapes, ratios)
    assert points.shape == (2, 24 + 6, 2, 2)
    for image in range(2):
        index = 0
        for level, (height, width) in enumerate(shapes):
            ratio_w, ratio_h = ratios[image, level].tolist()
            for y in range(height):
                for x in range(width):
                    # the pixel centre relative to its level's valid region, then on each level's padded map
                    centre = torch.tensor([(x + 0.5) / (width * ratio_w), (y + 0.5) / (height * ratio_h)])
                    torch.testing.assert_close(points[image, index], centre * ratios[image])
                    index += 1


def test_two_stage_proposals_and_their_embedding_by_hand():
    shapes = [(2, 60), (2, 2)]  # 60 columns: the last centre, 59.5 / 60, is past 0.99 and dropped
    mask = torch.zeros(2, 124, dtype=torch.bool)
    mask[1, 50:60] = mask[1, 110:120] = True  # image 1: 50 valid columns on level 0
    mask[1, 121] = mask[1, 123] = True  # and 1 on level 1
    logits, keep = encoder_proposals(mask, shapes)
    assert logits.shape == (2, 124, 4) and keep.shape == (2, 124, 1)
    for image in range(2):
        index = 0
        for level, (height, width) in enumerate(shapes):
            valid_w = {(0, 0): 60, (1, 0): 50, (0, 1): 2, (1, 1): 1}[image, level]
            for y in range(height):
                for x in range(width):
                    box = [(x + 0.5) / valid_w, (y + 0.5) / height, 0.05 * 2**level, 0.05 * 2**level]
                    kept = not mask[image, index] and all(0.01 < v < 0.99 for v in box)
                    assert keep[image, index, 0].item() == kept, (image, level, y, x)
                    expected = [math.log(v / (1 - v)) for v in box] if kept else [math.inf] * 4
                    torch.testing.assert_close(logits[image, index], torch.tensor(expected))
                    index += 1
    assert not keep[0, 59] and keep[0, 58] and not keep[1, 49] and keep[1, 48]

    boxes = torch.tensor([[[0.3, -1.0, 2.0, 0.0], [1.5, 0.2, -0.4, -2.0]]])
    embedding = proposal_position_embedding(boxes, num_pos_feats=4)
    expected = torch.empty(1, 2, 16)
    for k in range(2):
        for coordinate in range(4):
            for i in range(4):
                angle = torch.sigmoid(boxes[0, k, coordinate]) * 2 * math.pi / 10000 ** (2 * (i // 2) / 4)
                expected[0, k, coordinate * 4 + i] = angle.sin() if i % 2 == 0 else angle.cos()
    torch.testing.assert_close(embedding, expected)


def test_boxes_move_from_their_reference_in_logit_space():
    delta = torch.tensor([[0.5, -0.2, 0.1, 0.3]])
    point, box = torch.tensor([[0.25, 0.9]]), torch.tensor([[0.5, 0.1, 0.0, 1.0]])
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    expected = [0.5 + logit(0.25), -0.2 + logit(0.9), 0.1, 0.3]
    torch.testing.assert_close(offset_reference(delta, point), torch.tensor([expected]))
    # 0 and 1 are clamped to 1e-5 on either side of the ratio, so the logit stays finite
    expected = [0.5, -0.2 + logit(0.1), 0.1 + math.log(1e-5 / 1), 0.3 + math.log(1 / 1e-5)]
    torch.testing.assert_close(offset_reference(delta, box), torch.tensor([expected]))


# --- matching and losses --------------------------------------------------------------------------


def focal_cost_by_hand(logit: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    return alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)


def focal_loss_by_hand(logit: float, target: bool, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    cross_entropy = -math.log(p) if target else -math.log(1 - p)
    p_t = p if target else 1 - p
    return (alpha if target else 1 - alpha) * (1 - p_t) ** gamma * cross_entropy


def test_focal_class_cost_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    labels = torch.tensor([2, 0, 2])
    matcher = FocalHungarianMatcher()
    cost = matcher.class_cost(logits, labels)
    expected = [[focal_cost_by_hand(logits[q, c].item()) for c in labels.tolist()] for q in range(2)]
    torch.testing.assert_close(cost, torch.tensor(expected))
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (2.0, 5.0, 2.0)
    boxes, target_boxes = torch.rand(2, 4) * 0.5 + 0.25, torch.rand(3, 4) * 0.5 + 0.25
    box_only = HungarianMatcher(cost_class=0).cost_matrix(logits, boxes, labels, target_boxes)
    torch.testing.assert_close(matcher.cost_matrix(logits, boxes, labels, target_boxes), box_only + 2 * cost)


def target(labels, boxes) -> dict[str, torch.Tensor]:
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
    }


def test_focal_loss_by_hand_with_auxiliary_and_proposal_losses():
    # one image, two queries, three classes; query 0 sits on the target (class 1), query 1 far away
    logits = torch.tensor([[[0.3, 1.2, -0.7], [-1.5, 0.4, 2.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.1, 0.1, 0.05, 0.05]]])
    proposals = {"pred_logits": torch.tensor([[[-0.2, 0.9, 0.1], [1.0, -2.0, 0.3]]]), "pred_boxes": boxes}
    aux = [{"pred_logits": logits, "pred_boxes": boxes}]
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": aux, "enc_outputs": proposals}
    criterion = focal_criterion(DeformableDetrConfig(), 3)
    losses = criterion(outputs, [target([1], [[0.5, 0.5, 0.4, 0.4]])])
    expected_ce = sum(focal_loss_by_hand(logits[0, q, c].item(), q == 0 and c == 1) for q in range(2) for c in range(3))
    # the proposals are matched as "object or not": the target counts as class 0
    enc_logits = proposals["pred_logits"]
    expected_enc = sum(
        focal_loss_by_hand(enc_logits[0, q, c].item(), q == 0 and c == 0) for q in range(2) for c in range(3)
    )
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, abs=1e-6)
    assert losses["loss_ce_0"].item() == pytest.approx(expected_ce, abs=1e-6)
    assert losses["loss_ce_enc"].item() == pytest.approx(expected_enc, abs=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou_enc"].item() == pytest.approx(0, abs=1e-6)
    assert losses["class_error"].item() == 0 and "class_error_enc" not in losses
    weighted = 2 * (2 * expected_ce) + 2 * expected_enc  # box losses are zero
    assert criterion.weighted_total(losses).item() == pytest.approx(weighted, abs=1e-5)
    assert criterion.loss_weights == {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}

    # normalised by the box count, as the box losses: two images, one with no target
    two = {"pred_logits": logits.repeat(2, 1, 1), "pred_boxes": boxes.repeat(2, 1, 1)}
    halving = FocalSetCriterion(3, FocalHungarianMatcher(), num_boxes_reduce=lambda n: n * 2)
    halved = halving(two, [target([1], [[0.5, 0.5, 0.4, 0.4]]), target([], [])])
    empty_image = sum(focal_loss_by_hand(logits[0, q, c].item(), 0) for q in range(2) for c in range(3))
    assert halved["loss_ce"].item() == pytest.approx((expected_ce + empty_image) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="one logit per class: expected 3, got 4"):
        criterion({"pred_logits": torch.zeros(1, 2, 4), "pred_boxes": boxes}, [target([1], [[0.5, 0.5, 0.4, 0.4]])])


# --- post-processing ------------------------------------------------------------------------------


def test_topk_detections_against_a_sorted_list():
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 30, 5), torch.rand(2, 30, 4) * 0.5 + 0.25
    sizes = torch.tensor([[100, 200], [60, 80]])
    scores, labels, absolute = topk_detections({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert scores.shape == labels.shape == (2, 100) and absolute.shape == (2, 100, 4)
    for image in range(2):
        pairs = [(torch.sigmoid(logits[image, q, c]).item(), q, c) for q in range(30) for c in range(5)]
        ranked = sorted(pairs, reverse=True)[:100]
        height, width = sizes[image].tolist()
        expected_boxes = []
        for _, q, _ in ranked:
            cx, cy, w, h = boxes[image, q].tolist()
            x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
            expected_boxes.append([x0 * width, y0 * height, x1 * width, y1 * height])
        torch.testing.assert_close(scores[image], torch.tensor([s for s, _, _ in ranked]))
        assert labels[image].tolist() == [c for _, _, c in ranked]
        torch.testing.assert_close(absolute[image], torch.tensor(expected_boxes))
    few = topk_detections({"pred_logits": logits[:, :4], "pred_boxes": boxes[:, :4]}, sizes)  # 4 x 5 pairs: all
    assert few[0].shape == (2, 20)
    results = TopKPostProcess(num_detections=7)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert len(results) == 2 and results[1]["boxes"].shape == (7, 4)
    torch.testing.assert_close(results[1]["scores"], scores[1, :7])


def test_each_detector_names_its_post_processing(joiner):
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 10, 4), "pred_boxes": torch.rand(2, 10, 4)}
    sizes = torch.tensor([[64, 96], [48, 80]])
    detr = DETR(
        small_joiner(return_interm_layers=False), Transformer(D, 4, 1, 1, 64, return_intermediate_dec=True), 3, 10
    )
    deformable = deformable_detr(joiner, 4, **SMALL, num_feature_levels=5)
    for detector, rule, module in (
        (detr, softmax_detections, PostProcess()),
        (deformable, topk_detections, TopKPostProcess()),
    ):
        for got, want in zip(detector.detections(outputs, sizes), rule(outputs, sizes)):
            torch.testing.assert_close(got, want)
        # the head's post-processing module, DETR's API: the same detections, one dict per image
        for got, want in zip(module(outputs, sizes), per_image(*rule(outputs, sizes))):
            assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in got)


# --- training steps -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=["float32", "bfloat16"]
)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_forward_backward(joiner, option, dtype):
    torch.manual_seed(0)
    model = deformable_detr(joiner, 4, **SMALL, num_feature_levels=5, **OPTIONS[option])
    for head in model.bbox_embed:  # zero at first: boxes would not move from their references
        nn.init.normal_(head.layers[-1].weight, std=0.1)
    criterion = focal_criterion(DeformableDetrConfig(), 4)
    images = nested_tensor_from_tensor_list([torch.randn(3, 64, 96), torch.randn(3, 48, 80)])
    targets = [target([1, 3], [[0.5, 0.5, 0.3, 0.4], [0.2, 0.7, 0.2, 0.2]]), target([0], [[0.6, 0.4, 0.5, 0.5]])]
    seen = {}
    model.transformer.register_forward_hook(lambda module, args, output: seen.update(transformer=output))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(images)
        losses = criterion(out, targets)
    transformer_out = seen["transformer"]
    # the reference_points layer learns through the first layer's boxes; proposals are picked, not trained, here
    assert transformer_out.init_reference.requires_grad == (option != "two_stage")
    if option == "plain":  # no refinement: every layer keeps the initial reference points
        assert all(torch.equal(layer, transformer_out.init_reference) for layer in transformer_out.inter_references)
    else:  # the decoder's refined boxes are the detector's; each layer's step is its own (the next starts detached)
        assert transformer_out.inter_references.shape[-1] == 4
        assert torch.equal(out["pred_boxes"], transformer_out.inter_references[-1])
        assert torch.equal(out["aux_outputs"][0]["pred_boxes"], transformer_out.inter_references[0])
        first_head = list(model.bbox_embed[0].parameters())
        reached = torch.autograd.grad(out["pred_boxes"].sum(), first_head, retain_graph=True, allow_unused=True)
        assert all(grad is None or not grad.any() for grad in reached)
    if dtype == torch.float32:  # the last layer's boxes move from the reference the previous layer left
        reference = transformer_out.inter_references[0]
        delta = model.bbox_embed[1](transformer_out.hs[1])
        logit = torch.log(reference.clamp(min=1e-5) / (1 - reference).clamp(min=1e-5))
        moved = delta + logit if reference.shape[-1] == 4 else torch.cat([delta[..., :2] + logit, delta[..., 2:]], -1)
        torch.testing.assert_close(out["pred_boxes"], moved.sigmoid())
    assert out["pred_logits"].shape == (2, 10, 4) and out["pred_boxes"].shape == (2, 10, 4)
    assert out["pred_logits"].dtype == dtype
    assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 10, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    if option == "two_stage":
        positions = 16 * 24 + 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2  # strides 4..64 on the padded 64 x 96 batch
        assert out["enc_outputs"]["pred_logits"].shape == (2, positions, 4) and "loss_ce_enc" in losses
    else:
        assert "enc_outputs" not in out
    assert all(torch.isfinite(value) for value in losses.values())
    model.zero_grad(set_to_none=True)
    criterion.weighted_total(losses).backward()
    head = {name: p for name, p in model.named_parameters() if not name.startswith("backbone.") and p.requires_grad}
    missing = [name for name, p in head.items() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in head.values())


def test_a_bfloat16_two_stage_model_predicts_in_bfloat16(joiner):
    # the chosen proposals stay float32; their position embedding must follow the weights
    model = deformable_detr(copy.deepcopy(joiner), 4, **SMALL, num_feature_levels=5, **OPTIONS["two_stage"])
    model = model.eval().to(torch.bfloat16)
    images = nested_tensor_from_tensor_list([torch.randn(3, 64, 96), torch.randn(3, 48, 80)]).to(torch.bfloat16)
    with torch.inference_mode():
        out = model(images)
    assert out["pred_logits"].dtype == torch.bfloat16 and out["pred_logits"].shape == (2, 10, 4)
    assert torch.isfinite(out["pred_logits"]).all()
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
