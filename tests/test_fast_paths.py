"""Fast paths: each gives the plain path's outputs and gradients (within float32 rounding), keeps
DETR's state dict, and is switched by config."""

from __future__ import annotations

import copy
import dataclasses
from argparse import Namespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from detr_backbone import NestedTensor, build_backbone, nested_tensor_from_tensor_list
from detr_backbone.backbones.bn_folding import FoldedConv2d, fold_frozen_batch_norm
from detr_backbone.backbones.frozen_batch_norm import FrozenBatchNorm2d
from detr_backbone.config import BackboneConfig, JoinerConfig, PositionConfig
from detr_backbone.data import build_datamodule
from detr_backbone.detection import DetrConfig, build_detector
from detr_backbone.position_encoding import PositionEmbeddingSine
from detr_backbone.weights import load_checkpoint

from .jobs import compose_config

PLAIN = {"channels_last": False, "fold_frozen_bn": False}
# float32 rounding of a reordered sum over up to 3x3x512 products, through 20 layers
RTOL, ATOL_FRACTION = 1e-4, 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def joiner_with(name="resnet18", kind="torchvision", cache_size=None, **backbone):
    """A Joiner whose fast paths are the config defaults except those given, its weights drawn from one seed: a
    gradient is compared through every ReLU, and an unseeded draw now and then puts a pre-activation within
    rounding of zero, where the two paths' last bits take different sides of the kink."""
    torch.manual_seed(0)
    position = {} if cache_size is None else {"cache_size": cache_size}
    return build_backbone(
        {"backbone": {"kind": kind, "name": name, **backbone}, "position": position, "hidden_dim": 64}
    )


def randomize_frozen_norms(module: nn.Module, seed: int = 0) -> None:
    """Statistics far from the identity, so a wrongly folded scale or shift shows in the numbers."""
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, FrozenBatchNorm2d):
            size = norm.weight.shape
            norm.weight.copy_(torch.rand(size, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(size, generator=generator) * 0.2)
            norm.running_mean.copy_(torch.randn(size, generator=generator) * 0.2)
            norm.running_var.copy_(torch.rand(size, generator=generator) + 0.5)


def padded_batch(seed: int = 0) -> NestedTensor:
    generator = torch.Generator().manual_seed(seed)
    return nested_tensor_from_tensor_list(
        [torch.randn(3, 64, 96, generator=generator), torch.randn(3, 48, 80, generator=generator)]
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL_FRACTION * expected.abs().max().item())


def outputs_and_grads(joiner: nn.Module, images: NestedTensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    joiner.zero_grad(set_to_none=True)
    (feature,), (position,) = joiner(images)
    (feature.tensors.square().mean() + (feature.tensors * position[:, :1]).mean()).backward()
    grads = {name: p.grad for name, p in joiner.named_parameters() if p.requires_grad}
    return feature.tensors.detach(), grads


def pair(plain: nn.Module, fast_paths: dict) -> tuple[nn.Module, nn.Module]:
    """``plain`` and a Joiner built with ``fast_paths`` holding the same weights."""
    fast = joiner_with(**fast_paths)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


# --- frozen BatchNorm folded into the convolution ------------------------------------------------


def test_folding_pairs_every_resnet50_norm_and_keeps_detr_state_dict():
    plain = joiner_with("resnet50", **PLAIN)
    folded = copy.deepcopy(plain)
    assert fold_frozen_batch_norm(folded[0].body) == 53  # stem + 16 blocks x 3 + 4 downsample
    assert fold_frozen_batch_norm(folded[0].body) == 0  # nothing left to fold
    state, folded_state = plain.state_dict(), folded.state_dict()
    assert list(folded_state) == list(state) and len(state) == 265
    assert all(torch.equal(folded_state[key], state[key]) for key in state)
    assert "0.body.layer1.0.downsample.1.running_var" in folded_state and "0.body.bn1.weight" in folded_state
    assert isinstance(folded[0].body.layer1[0].downsample[0], FoldedConv2d)


def test_folded_outputs_and_gradients_match_plain_path():
    plain = joiner_with("resnet18", **PLAIN)
    randomize_frozen_norms(plain)
    plain, folded = pair(plain, {"name": "resnet18", "channels_last": False, "fold_frozen_bn": True})
    assert sum(isinstance(m, FoldedConv2d) for m in folded.modules()) == 20
    images = padded_batch()
    expected, expected_grads = outputs_and_grads(plain, images)
    actual, grads = outputs_and_grads(folded, images)
    assert_close(actual, expected)
    # DETR's rule trains layer2..layer4: the folded convolutions there receive their gradients
    assert grads.keys() == expected_grads.keys() and "0.body.layer2.0.conv1.weight" in grads
    for name in grads:
        assert_close(grads[name], expected_grads[name])


def test_folded_norm_buffers_still_load_from_a_detr_checkpoint(tmp_path):
    """A DETR-style detector checkpoint loads into the default (folded, NHWC) Joiner and gives the
    outputs of the plain Joiner that loaded it."""
    source = joiner_with("resnet50", **PLAIN)
    randomize_frozen_norms(source, seed=1)
    path = tmp_path / "detr.pth"
    torch.save({"model": {f"backbone.{key}": value for key, value in source.state_dict().items()}}, path)
    fast = joiner_with("resnet50")  # defaults: folded, channels_last
    report = load_checkpoint(fast, path)
    assert report.loaded == 265
    assert fast[0].body.bn1.running_var.data_ptr() == fast[0].body.conv1.norm.running_var.data_ptr()
    images = padded_batch(seed=2)
    with torch.no_grad():
        assert_close(fast(images)[0][0].tensors, source(images)[0][0].tensors)


def test_folding_leaves_groupnorm_alone():
    assert fold_frozen_batch_norm(joiner_with("resnet18", kind="groupnorm", **PLAIN)) == 0


def test_timms_frozen_resnet_norms_fold_with_the_same_outputs_and_gradients():
    # timm freezes its ResNets' BatchNorms as torchvision's FrozenBatchNorm2d: stem + 8 blocks x 2 + 3 shortcuts
    plain = joiner_with("resnet18", kind="timm", **PLAIN)
    randomize_frozen_norms(plain)
    plain, folded = pair(plain, {"name": "resnet18", "kind": "timm", "channels_last": False, "fold_frozen_bn": True})
    assert sum(isinstance(m, FoldedConv2d) for m in folded.modules()) == 20
    images = padded_batch(seed=4)
    expected, expected_grads = outputs_and_grads(plain, images)
    actual, grads = outputs_and_grads(folded, images)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL_FRACTION * expected.abs().max().item())
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(grad, expected_grads[name], rtol=RTOL, atol=ATOL_FRACTION * max(scale, 1e-12))


def test_folded_convolution_keeps_bf16_under_autocast():
    folded = joiner_with("resnet18", channels_last=False, fold_frozen_bn=True).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (feature,), (position,) = folded(padded_batch())
    assert feature.tensors.dtype == position.dtype == torch.bfloat16


# --- channels_last -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["torchvision", "groupnorm"])
def test_channels_last_outputs_and_gradients_match_plain_path(kind):
    plain = joiner_with("resnet18", kind=kind, **PLAIN)
    plain, fast = pair(plain, {"name": "resnet18", "kind": kind, "channels_last": True, "fold_frozen_bn": False})
    assert fast[0].body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = padded_batch(seed=3)
    expected, expected_grads = outputs_and_grads(plain, images)
    actual, grads = outputs_and_grads(fast, images)
    assert_close(actual, expected)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert_close(grads[name], expected_grads[name])
    assert list(fast.state_dict()) == list(plain.state_dict())


def test_defaults_turn_on_the_fast_paths_that_measured_faster_and_detr_args_keep_detr_path():
    assert (BackboneConfig().fold_frozen_bn, BackboneConfig().compile, PositionConfig().cache_size) == (True, False, 0)
    default = joiner_with("resnet18")
    assert default[0].channels_last and isinstance(default[0].body.conv1, FoldedConv2d)
    assert default[1].cache.max_entries == 0  # measured no gain (docs/performance.md)
    groupnorm = joiner_with("resnet18", kind="groupnorm")
    assert groupnorm[0].channels_last is False  # measured slower with GroupNorm (docs/performance.md)
    detr = JoinerConfig.from_args(
        Namespace(
            backbone="resnet50",
            lr_backbone=1e-5,
            masks=False,
            dilation=False,
            position_embedding="sine",
            hidden_dim=256,
        )
    )
    assert (detr.backbone.channels_last, detr.backbone.fold_frozen_bn) == (False, False)


# --- positional-encoding cache -------------------------------------------------------------------


def masks_for(*valid: tuple[int, int], size=(6, 8)) -> NestedTensor:
    mask = torch.ones(len(valid), *size, dtype=torch.bool)
    for index, (height, width) in enumerate(valid):
        mask[index, :height, :width] = False
    return NestedTensor(torch.zeros(len(valid), 1, *size), mask)


def test_cache_returns_the_uncached_values_and_hits_on_repeats():
    cached, uncached = (
        PositionEmbeddingSine(16, normalize=True, cache_size=4),
        PositionEmbeddingSine(16, normalize=True),
    )
    inputs = [
        masks_for((6, 8), (4, 5)),
        masks_for((6, 8), (4, 5)),
        masks_for((6, 8), (5, 4)),
        masks_for((6, 8), (4, 5)),
    ]
    for tensor_list in inputs:
        assert torch.equal(cached(tensor_list), uncached(tensor_list))
    assert len(cached.cache) == 2  # same shape, different content: two entries
    assert not torch.equal(cached(inputs[0]), cached(inputs[2]))


def test_cache_is_bounded_and_evicts_least_recently_used():
    encoding = PositionEmbeddingSine(8, normalize=True, cache_size=3)
    first = masks_for((1, 1))
    encoding(first)
    for height in range(2, 6):
        encoding(masks_for((height, 2)))
        assert len(encoding.cache) <= 3
    assert len(encoding.cache) == 3
    key_masks = [key[3] for key in encoding.cache._entries]
    assert first.mask.numpy().tobytes() not in key_masks


def test_cache_result_cannot_be_mutated_into_the_cache():
    encoding = PositionEmbeddingSine(8, normalize=True, cache_size=2)
    tensor_list = masks_for((3, 4), (6, 8))
    expected = PositionEmbeddingSine(8, normalize=True)(tensor_list)
    encoding(tensor_list).zero_()
    encoding(tensor_list).add_(5.0)
    assert torch.equal(encoding(tensor_list), expected)


def test_cache_keys_on_shape_and_dtype_of_the_mask():
    encoding = PositionEmbeddingSine(8, normalize=True, cache_size=4)
    small = NestedTensor(torch.zeros(1, 1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.bool))
    wide = NestedTensor(torch.zeros(1, 1, 3, 2), torch.zeros(1, 3, 2, dtype=torch.bool))  # same bytes, other shape
    assert encoding(small).shape == (1, 16, 2, 3) and encoding(wide).shape == (1, 16, 3, 2)
    assert len(encoding.cache) == 2


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: PositionEmbeddingSine(8, cache_size=-1), "cache size must be >= 0"),
        (lambda: PositionConfig(cache_size=-2), "position.cache_size=-2 must be >= 0"),
    ],
)
def test_bad_cache_size_is_named(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make()


# --- torch.compile and fixed batch sizes ---------------------------------------------------------


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported on this platform")
@pytest.mark.parametrize("kind", ["torchvision", "groupnorm"])
def test_joiner_traces_as_one_graph_with_every_fast_path_on(kind):
    joiner = joiner_with("resnet18", kind=kind, cache_size=8)
    explanation = torch._dynamo.explain(joiner)(padded_batch())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert len(joiner[1].cache) == 0  # the cache stepped aside while tracing


def test_compile_option_compiles_in_place_and_keeps_keys():
    compiled, eager = joiner_with("resnet18", compile=True), joiner_with("resnet18")
    assert compiled._compiled_call_impl is not None and eager._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_size_divisibility_reaches_the_collate():
    cfg = compose_config(
        "data.size_divisibility=32",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "data.train_size=8",
        "data.min_size=64",
        "data.max_size=96",
    )
    loader = build_datamodule(cfg.data).train_dataloader()
    assert loader.collate_fn.size_divisibility == 32
    images, _ = next(iter(loader))
    assert images.tensors.shape[-2] % 32 == 0 and images.tensors.shape[-1] % 32 == 0
    assert images.mask[:, -1].any()  # 64-96 px images padded up to 96 or 128: real padding


def test_model_compile_option_compiles_the_detector_in_place():
    cfg = compose_config(
        "model=detr_small",
        "hidden_dim=32",
        "model.enc_layers=1",
        "model.dec_layers=1",
        "model.dim_feedforward=64",
        "model.compile=true",
    )
    head = DetrConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    joiner_cfg = JoinerConfig.from_args({"backbone": {"name": "resnet18"}, "hidden_dim": 32})
    compiled = build_detector(joiner_cfg, head, num_classes=3)
    eager = build_detector(joiner_cfg, dataclasses.replace(head, compile=False), num_classes=3)
    assert compiled._compiled_call_impl is not None and eager._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())
