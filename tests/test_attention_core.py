"""Every implementation of deformable attention's core against the grid_sample reference: outputs and
the gradients of values, sampling locations and attention weights, in each dtype and at the edges
(points off the map, 1x1 maps, levels of very different sizes, padded batch entries)."""

from __future__ import annotations

import pytest
import torch

from detr_backbone import build_backbone
from detr_backbone.detection.deformable import DeformableDetrConfig, MSDeformAttn
from detr_backbone.detection.multiscale.sampling import (
    ATTENTION_IMPLS,
    multi_scale_deformable_attention,
    resolve_attention_impl,
)
from detr_backbone.detection.multiscale.sampling.gather import GatherAttention

FAST = ["gather"]
# Levels of very different sizes: a wide map, a tall one, a 1x1 map; 4 points per head and level.
SHAPES = [(9, 13), (5, 2), (1, 1), (3, 4)]


def core_inputs(shapes, batch=2, queries=6, heads=2, channels=3, points=4, dtype=torch.float64, seed=0):
    """Random value, locations (a fifth of them off the map, some far off) and softmax weights."""
    generator = torch.Generator().manual_seed(seed)
    length = sum(h * w for h, w in shapes)
    value = torch.randn(batch, length, heads, channels, generator=generator, dtype=dtype)
    size = (batch, queries, heads, len(shapes), points)
    locations = torch.rand(*size, 2, generator=generator, dtype=dtype) * 1.5 - 0.25
    locations[0, 0, 0, :, 0] = torch.tensor([-3.0, 7.0], dtype=dtype)  # far outside
    locations[0, 1, 0, :, 0] = torch.tensor([0.0, 1.0], dtype=dtype)  # on the map's outer corners
    weights = torch.rand(*size, generator=generator, dtype=dtype).view(*size[:3], -1).softmax(-1).view(size)
    return value, locations, weights


def output_and_gradients(impl, shapes, value, locations, weights, upstream):
    inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    output = multi_scale_deformable_attention(inputs[0], shapes, inputs[1], inputs[2], impl)
    (output.float() * upstream).sum().backward()
    return output, [t.grad for t in inputs]


@pytest.mark.parametrize("impl", FAST)
def test_gradcheck_in_float64(impl):
    value, locations, weights = core_inputs(SHAPES, queries=3, points=2)
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_attention(v, SHAPES, loc, w, impl), inputs, eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    # half inputs are sampled in float32 by every path; what differs is the order of the sums
    [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)],
)
def test_outputs_and_gradients_equal_the_reference(impl, dtype, tolerance):
    value, locations, weights = (t.to(dtype) for t in core_inputs(SHAPES, queries=20, channels=8))
    upstream = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(1))
    reference, reference_grads = output_and_gradients("grid_sample", SHAPES, value, locations, weights, upstream)
    output, grads = output_and_gradients(impl, SHAPES, value, locations, weights, upstream)
    assert output.dtype == dtype
    torch.testing.assert_close(output, reference, rtol=tolerance, atol=tolerance)
    for name, got, want in zip(("value", "locations", "weights"), grads, reference_grads):
        assert got.dtype == dtype
        scale = want.float().abs().max().item()
        torch.testing.assert_close(
            got.float(), want.float(), rtol=tolerance, atol=tolerance * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("impl", FAST)
def test_points_off_the_map_read_zero_and_have_no_gradient(impl):
    shapes = [(3, 4)]
    value, locations, weights = core_inputs(shapes, batch=1, queries=2, heads=1, points=1)
    # all outside: beyond each border by more than half a pixel, so no corner is on the map
    locations[0, 0, 0, 0, 0] = torch.tensor([-0.2, 0.5])
    locations[0, 1, 0, 0, 0] = torch.tensor([0.5, 1.2])
    output, (grad_value, grad_locations, grad_weights) = output_and_gradients(
        impl, shapes, value, locations, weights, torch.ones(1, 2, 3)
    )
    assert torch.equal(output, torch.zeros_like(output))
    assert not grad_value.any() and not grad_locations.any() and not grad_weights.any()


@pytest.mark.parametrize("impl", FAST)
def test_a_point_at_a_pixel_centre_reads_that_pixel(impl):
    shapes = [(2, 3), (1, 1)]
    value = torch.arange(7 * 2, dtype=torch.float64).view(1, 7, 1, 2)
    locations = torch.tensor([[(1.5 / 3, 0.5 / 2)], [(0.5, 0.5)]], dtype=torch.float64)  # pixel (x=1, y=0); the 1x1 map
    locations = locations.view(1, 1, 1, 2, 1, 2)
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64).view(1, 1, 1, 2, 1)
    output = multi_scale_deformable_attention(value, shapes, locations, weights, impl)
    expected = 0.25 * value[0, 1, 0] + 0.75 * value[0, 6, 0]
    torch.testing.assert_close(output.view(2), expected)


@pytest.mark.parametrize("impl", FAST)
def test_msdeformattn_with_a_padded_batch_entry_equals_the_reference(impl):
    torch.manual_seed(0)
    shapes = [(6, 8), (3, 4)]
    attention = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
    nn_init_offsets = torch.randn_like(attention.sampling_offsets.weight) * 0.1  # bend the initial pattern
    with torch.no_grad():
        attention.sampling_offsets.weight.copy_(nn_init_offsets)
    memory = torch.randn(2, 60, 16)
    padding = torch.zeros(2, 60, dtype=torch.bool)
    padding[1, 4:8] = padding[1, 52:] = True  # the second image is narrower
    references = torch.rand(2, 60, 2, 2)
    outputs = {}
    for name in ("grid_sample", impl):
        attention.attention_impl = name
        attention.zero_grad()
        out = attention(memory, references, memory, shapes, padding)
        out.square().sum().backward()
        outputs[name] = (out, [p.grad.clone() for p in attention.parameters()])
    torch.testing.assert_close(outputs[impl][0], outputs["grid_sample"][0], rtol=1e-6, atol=1e-6)
    for got, want in zip(outputs[impl][1], outputs["grid_sample"][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def saved_bytes(impl, value, locations, weights, shapes) -> int:
    """Bytes the autograd graph keeps for the backward: what a training step holds per attention layer."""
    saved: dict[int, int] = {}

    def pack(tensor):
        saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
        multi_scale_deformable_attention(inputs[0], shapes, inputs[1], inputs[2], impl)
    return sum(saved.values())


def test_the_gather_core_keeps_a_fifth_of_the_references_activations():
    # Deformable DETR's encoder: 8 heads of 32 channels, 4 levels, 4 points, queries at every position
    shapes = [(16, 20), (8, 10), (4, 5), (2, 3)]
    value, locations, weights = core_inputs(shapes, batch=1, queries=426, heads=8, channels=32, dtype=torch.float32)
    reference = saved_bytes("grid_sample", value, locations, weights, shapes)
    gather = saved_bytes("gather", value, locations, weights, shapes)
    # the reference keeps 16 samples x 32 channels per query and head (2 KiB), the gather core
    # the top-left int32 rows and two fractions (192 bytes), the bordered value and the weights
    assert gather < 0.25 * reference, (gather, reference)


def test_the_backward_skips_gradients_nobody_asked_for():
    value, locations, weights = core_inputs(SHAPES)
    value.requires_grad_()
    output = multi_scale_deformable_attention(value, SHAPES, locations, weights, "gather")
    assert output.grad_fn.name() == GatherAttention.__name__ + "Backward"
    (grad_value,) = torch.autograd.grad(output.sum(), value)
    assert grad_value.shape == value.shape


def test_auto_takes_the_reference_for_small_inputs_and_gather_for_large_ones():
    small = 2 * 100 * 8 * 4 * 4 * 4  # a decoder's corner reads
    large = 17821 * 8 * 4 * 4 * 4  # an 800x1066 image's encoder
    assert resolve_attention_impl("auto", "cpu", small) == "grid_sample"
    assert resolve_attention_impl("auto", "cpu", large) == "gather"
    assert resolve_attention_impl("gather", "cpu", small) == "gather"


def test_implementation_names_are_checked():
    assert ATTENTION_IMPLS[0] == "auto" and resolve_attention_impl("auto") == "auto"
    with pytest.raises(ValueError, match=r"attention_impl='fused' is not one of auto, grid_sample, gather, triton"):
        resolve_attention_impl("fused")
    with pytest.raises(ValueError, match="attention_impl='fused'"):
        MSDeformAttn(attention_impl="fused")


@pytest.fixture(scope="module")
def joiner_for_core():
    torch.manual_seed(0)
    backbone = {"kind": "groupnorm", "name": "resnet18", "return_interm_layers": True, "trainable_layers": 5}
    position = {"kind": "sine", "offset": -0.5}
    return build_backbone({"backbone": backbone, "position": position, "hidden_dim": 32, "lr_backbone": 1e-4})


@pytest.mark.slow
def test_a_detector_built_with_each_core_gives_the_same_detections_and_gradients(joiner_for_core):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 72)
    detectors = {}
    for impl in ("grid_sample", "gather"):
        torch.manual_seed(1)
        head = DeformableDetrConfig(
            num_queries=5, enc_layers=1, dec_layers=2, dim_feedforward=32, dropout=0.0, num_feature_levels=4, nheads=4,
            attention_impl=impl, with_box_refine=True,
        )  # fmt: skip
        detectors[impl] = head.build(joiner_for_core, num_classes=3, hidden_dim=32)
    attention = [m for m in detectors["gather"].modules() if isinstance(m, MSDeformAttn)]
    assert len(attention) == 3 and {m.attention_impl for m in attention} == {"gather"}
    results = {}
    for impl, detector in detectors.items():
        out = detector(images)
        (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
        grads = {name: p.grad for name, p in detector.named_parameters() if p.grad is not None}
        results[impl] = (out, grads)
        joiner_for_core.zero_grad()
    torch.testing.assert_close(results["gather"][0]["pred_logits"], results["grid_sample"][0]["pred_logits"])
    torch.testing.assert_close(results["gather"][0]["pred_boxes"], results["grid_sample"][0]["pred_boxes"])
    assert results["gather"][1].keys() == results["grid_sample"][1].keys()
    for name, grad in results["gather"][1].items():
        torch.testing.assert_close(
            grad, results["grid_sample"][1][name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
