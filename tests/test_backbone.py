"""Backbones: module tree, levels, dilation, freezing rules and the reference bugs they fix."""

from __future__ import annotations

from argparse import Namespace

import pytest
import timm
import torch
import torchvision
from timm.layers import BatchNormAct2d
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detr_backbone import (
    Backbone,
    GroupNorm32,
    Joiner,
    PositionEmbeddingSine,
    TimmBackbone,
    build_backbone,
    joiner_parameter_groups,
    nested_tensor_from_tensor_list,
)
from detr_backbone.config import JoinerConfig


def joiner_of(kind="torchvision", name="resnet50", lr_backbone=1e-5, position="sine", **backbone):
    return build_backbone(
        {
            "backbone": {"kind": kind, "name": name, **backbone},
            "position": {"kind": position},
            "lr_backbone": lr_backbone,
        }
    )


def trainable_names(module: nn.Module) -> set[str]:
    return {name for name, parameter in module.named_parameters() if parameter.requires_grad}


def detr_rule(model: nn.Module) -> set[str]:
    """DETR's own rule, by name: layer2..layer4 train, everything else is frozen."""
    return {name for name, _ in model.named_parameters() if any(f"layer{i}" in name for i in (2, 3, 4))}


def batch(*sizes):
    return nested_tensor_from_tensor_list([torch.randn(3, h, w) for h, w in sizes])


# --- module tree and levels ------------------------------------------------------------------


def test_joiner_is_a_two_child_sequential_with_detr_names():
    joiner = joiner_of(name="resnet18")
    assert isinstance(joiner, nn.Sequential) and [name for name, _ in joiner.named_children()] == ["0", "1"]
    assert [name for name, _ in joiner[0].body.named_children()] == [
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    assert all(not isinstance(m, nn.BatchNorm2d) for m in joiner.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in joiner.modules()) == 20


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("resnet18", [64, 128, 256, 512]),
        pytest.param("resnet50", [256, 512, 1024, 2048], marks=pytest.mark.slow),
        pytest.param("wide_resnet50_2", [256, 512, 1024, 2048], marks=pytest.mark.slow),
    ],
)
def test_intermediate_levels_have_the_stage_channels_and_strides(name, channels):
    joiner = joiner_of(name=name, return_interm_layers=True)
    features, positions = joiner(batch((128, 160), (96, 128)))
    assert [f.tensors.shape[1] for f in features] == channels == joiner[0].feature_channels
    assert [f.tensors.shape[-2:] for f in features] == [(128 // s, 160 // s) for s in (4, 8, 16, 32)]
    assert [p.shape for p in positions] == [(2, 256, 128 // s, 160 // s) for s in (4, 8, 16, 32)]
    assert joiner.num_channels == channels[-1]


def test_single_level_by_default_named_zero():
    out = joiner_of(name="resnet18")[0](batch((64, 96)))
    assert list(out) == ["0"] and out["0"].tensors.shape == (1, 512, 2, 3)


def test_mask_is_downsampled_per_level():
    images = batch((128, 128), (64, 96))
    features, _ = joiner_of(name="resnet18", return_interm_layers=True)(images)
    for feature, stride in zip(features, (4, 8, 16, 32)):
        h, w = 128 // stride, 128 // stride
        expected = torch.ones(2, h, w, dtype=torch.bool)
        expected[0] = False
        expected[1, : 64 // stride, : 96 // stride] = False
        assert torch.equal(feature.mask, expected)


# --- dilation --------------------------------------------------------------------------------


@pytest.mark.slow
def test_dilation_replaces_the_last_stride_only():
    plain, dilated = joiner_of(name="resnet50"), joiner_of(name="resnet50", dilation=True)
    layer4 = dilated[0].body.layer4
    assert layer4[0].conv2.stride == (1, 1) and layer4[0].downsample[0].stride == (1, 1)
    assert layer4[0].conv2.dilation == (1, 1) and all(block.conv2.dilation == (2, 2) for block in layer4[1:])
    assert dilated[0].body.layer3[0].conv2.stride == (2, 2) and dilated[0].body.layer3[1].conv2.dilation == (1, 1)
    images = batch((256, 320))
    assert plain(images)[0][0].tensors.shape[-2:] == (8, 10)  # H/32
    assert dilated(images)[0][0].tensors.shape[-2:] == (16, 20)  # H/16
    assert dilated[0].strides == [16]


def test_dilation_on_timm_uses_output_stride_16():
    joiner = joiner_of("timm", "resnet18", dilation=True)
    assert joiner(batch((128, 192)))[0][0].tensors.shape[-2:] == (8, 12)


# --- freezing --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "name"), [("torchvision", "resnet50"), ("groupnorm", "resnet101")])
def test_detr_rule_trains_layer2_to_layer4_only(kind, name):
    norm = GroupNorm32 if kind == "groupnorm" else FrozenBatchNorm2d
    reference = torchvision.models.get_model(name, norm_layer=norm)
    body = joiner_of(kind, name)[0].body
    assert trainable_names(body) == detr_rule(reference) - {"fc.weight", "fc.bias"}
    if kind == "groupnorm":  # GroupNorm's affine parameters follow their stage
        assert "layer2.0.bn1.weight" in trainable_names(body) and "bn1.weight" not in trainable_names(body)


def test_zero_backbone_lr_and_freeze_backbone_freeze_everything():
    assert trainable_names(joiner_of(lr_backbone=0.0, position="learned")) == set()
    assert trainable_names(joiner_of(freeze=True, position="learned")) == set()


@pytest.mark.parametrize(("layers", "first"), [(0, None), (1, "layer4"), (2, "layer3"), (4, "layer1"), (5, "conv1")])
def test_trainable_layers_counts_stages_from_the_end(layers, first):
    body = joiner_of(name="resnet18", trainable_layers=layers)[0].body
    order = ["conv1", "layer1", "layer2", "layer3", "layer4"]
    expected_stages = order[order.index(first) :] if first else []
    assert {name.split(".")[0] for name in trainable_names(body)} == set(expected_stages)


def test_timm_efficientnet_stages_follow_feature_info():
    # efficientnet_b0 features: blocks.1 (stride 4), blocks.2 (8), blocks.4 (16), blocks.6 (32);
    # blocks.3 and blocks.5 sit between levels and belong to the following stage.
    body = joiner_of("timm", "efficientnet_b0")[0].body
    assert {".".join(n.split(".")[:2]) for n in trainable_names(body)} == {f"blocks.{i}" for i in range(2, 7)}
    body = joiner_of("timm", "efficientnet_b0", trainable_layers=1)[0].body
    assert {".".join(n.split(".")[:2]) for n in trainable_names(body)} == {"blocks.5", "blocks.6"}
    body = joiner_of("timm", "efficientnet_b0", trainable_layers=5)[0].body
    assert trainable_names(body) == {name for name, _ in body.named_parameters()}


def test_timm_convnext_stages_and_stem():
    body = joiner_of("timm", "convnext_atto", trainable_layers=4)[0].body
    assert {n.split(".")[0] for n in trainable_names(body)} == {"stages_0", "stages_1", "stages_2", "stages_3"}
    assert all(not body.get_parameter(n).requires_grad for n, _ in body.named_parameters() if n.startswith("stem"))


@pytest.mark.parametrize("kind", ["torchvision", "groupnorm", "timm"])
def test_main_layer_cuts_the_body_so_every_trainable_parameter_gets_a_gradient(kind):
    backbone = joiner_of(kind, "resnet18", main_layer=-2, trainable_layers=5)[0]
    assert not hasattr(backbone.body, "layer4") and backbone.num_channels == 256
    assert backbone.strides == [16]
    out = backbone(batch((64, 96)))["0"].tensors
    assert out.shape == (1, 256, 4, 6)
    out.sum().backward()
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


# --- reference bugs --------------------------------------------------------------------------


def mdetr_replace_bn(module: nn.Module) -> None:
    """MDETR's replacement walk, over ``dir()``: it never sees children named by digits."""
    for attr in dir(module):
        target = getattr(module, attr)
        if isinstance(target, nn.BatchNorm2d):
            setattr(module, attr, FrozenBatchNorm2d(target.num_features))
    for _, child in module.named_children():
        mdetr_replace_bn(child)


def test_no_live_batchnorm_survives_in_timm_bodies():
    reference = timm.create_model("resnet50", features_only=True, out_indices=(1, 2, 3, 4))
    mdetr_replace_bn(reference)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules()) == 4  # the downsample.1 norms
    ours = TimmBackbone("resnet50", return_interm_layers=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ours.modules()) == 0


@pytest.mark.slow
def test_timm_frozen_norms_keep_activation_and_eps():
    # tf_efficientnet_b0 uses BatchNormAct2d with eps=1e-3 and SiLU fused into the norm
    source = timm.create_model("tf_efficientnet_b0", features_only=True, out_indices=(-1,)).eval()
    assert isinstance(source.bn1, BatchNormAct2d) and source.bn1.eps == 1e-3
    with torch.no_grad():
        for module in source.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    ours = TimmBackbone("tf_efficientnet_b0")
    ours.body.load_state_dict(source.state_dict())
    assert isinstance(ours.body.bn1.act, nn.SiLU) and ours.body.bn1.eps == 1e-3
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours.body(x)[-1], source(x)[-1], rtol=1e-4, atol=1e-5)


def test_timm_backbone_applies_freezing():
    assert trainable_names(joiner_of("timm", "resnet18", lr_backbone=0.0)) == set()
    body = joiner_of("timm", "resnet18")[0].body
    assert trainable_names(body) == detr_rule(body)


def test_learned_table_with_zero_backbone_lr_is_frozen_not_silently_idle():
    # DETR grouped by the substring "backbone": the table went to lr_backbone=0 yet kept requires_grad.
    cfg = JoinerConfig.from_args(
        {"backbone": {"name": "resnet18"}, "position": {"kind": "learned"}, "lr_backbone": 0.0}
    )
    joiner = build_backbone(cfg)
    assert trainable_names(joiner) == set() and joiner_parameter_groups(joiner, cfg) == []
    cfg = JoinerConfig.from_args(
        {"backbone": {"name": "resnet18"}, "position": {"kind": "learned", "lr": 1e-4}, "lr_backbone": 0.0}
    )
    joiner = build_backbone(cfg)
    groups = joiner_parameter_groups(joiner, cfg)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("position", 1e-4, 2)]


def test_parameter_groups_hold_every_trainable_parameter_once():
    cfg = JoinerConfig.from_args(
        {"backbone": {"name": "resnet18"}, "position": {"kind": "learned"}, "lr_backbone": 2e-5}
    )
    joiner = build_backbone(cfg)
    groups = joiner_parameter_groups(joiner, cfg)
    assert [(g["name"], g["lr"]) for g in groups] == [("backbone", 2e-5), ("position", 2e-5)]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in joiner.parameters() if p.requires_grad)


# --- DETR drop-in ----------------------------------------------------------------------------


@pytest.mark.slow
def test_detr_constructors_and_args_give_the_same_tree_and_numbers():
    torch.manual_seed(0)
    by_hand = Joiner(Backbone("resnet50", True, False, False), PositionEmbeddingSine(128, 10000, True, None))
    args = Namespace(
        backbone="resnet50", lr_backbone=1e-5, masks=False, dilation=False, position_embedding="sine", hidden_dim=256
    )
    built = build_backbone(args)
    assert built.state_dict().keys() == by_hand.state_dict().keys()
    assert trainable_names(built) == trainable_names(by_hand)
    built.load_state_dict(by_hand.state_dict())
    images = batch((96, 128), (64, 80))
    (f1,), (p1,) = by_hand(images)
    (f2,), (p2,) = built(images)
    assert torch.equal(f1.tensors, f2.tensors) and torch.equal(p1, p2) and torch.equal(f1.mask, f2.mask)
    assert built.num_channels == 2048


def test_mdetr_names_select_groupnorm_and_timm():
    gn = build_backbone(
        Namespace(
            backbone="resnet50-gn", lr_backbone=1e-5, masks=True, dilation=False, position_embedding="v3", hidden_dim=64
        )
    )
    assert any(isinstance(m, nn.GroupNorm) for m in gn.modules()) and len(gn[0].feature_channels) == 4
    timm_joiner = build_backbone(
        Namespace(
            backbone="timm_resnet18",
            lr_backbone=1e-5,
            masks=False,
            dilation=False,
            position_embedding="sine",
            hidden_dim=64,
        )
    )
    assert isinstance(timm_joiner[0], TimmBackbone)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "fragment"),
    [
        ({"name": "resnet51"}, "unknown torchvision ResNet 'resnet51'"),
        ({"name": "resnet18", "dilation": True}, "dilation=true needs bottleneck blocks"),
        ({"kind": "timm", "name": "efficientnet_b99"}, "unknown timm model 'efficientnet_b99'"),
        ({"kind": "timm", "name": "vit_tiny_patch16_224", "dilation": True}, "does not support dilation=true"),
        ({"kind": "timm", "name": "resnet18", "main_layer": 4}, "main_layer=4 must be in -4..3"),
        ({"trainable_layers": 6}, "trainable_layers=6"),
        ({"kind": "resnet"}, "backbone.kind='resnet' is not one of torchvision, groupnorm, timm"),
        ({"dilaton": True}, "Key 'dilaton' not in 'BackboneConfig'"),
    ],
)
def test_bad_backbone_config_names_the_value(backbone, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build_backbone({"backbone": backbone, "lr_backbone": 1e-5})


def test_trainable_layers_without_backbone_lr_is_rejected():
    with pytest.raises(ValueError, match="trainable_layers=2 trains stages that lr_backbone=0"):
        build_backbone({"backbone": {"name": "resnet18", "trainable_layers": 2}, "lr_backbone": 0.0})


@pytest.mark.parametrize(
    ("knob", "fragment"), [({"hidden_dim": 255}, "hidden_dim=255"), ({"lr_backbone": -1e-5}, "lr_backbone=-1e-05")]
)
def test_bad_top_level_knobs(knob, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_backbone({"backbone": {"name": "resnet18"}, "lr_backbone": 1e-5, **knob})
