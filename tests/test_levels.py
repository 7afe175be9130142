"""Level selection (``backbone.levels``) for every backbone kind, and the Deformable-DETR drop-in."""

from __future__ import annotations

import math
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from detr_backbone import build_backbone, build_position_encoding, nested_tensor_from_tensor_list
from detr_backbone.config import BackboneConfig


def joiner_of(kind, name, levels, **backbone):
    config = {
        "backbone": {"kind": kind, "name": name, "levels": levels, **backbone},
        "hidden_dim": 64,
        "lr_backbone": 1e-5,
    }
    return build_backbone(config)


def deformable_args(**overrides):
    """Deformable-DETR's main.py defaults for the fields its build_backbone reads."""
    values = dict(
        backbone="resnet50",
        lr_backbone=2e-5,
        masks=False,
        dilation=False,
        position_embedding="sine",
        hidden_dim=256,
        num_feature_levels=4,
    )
    return Namespace(**{**values, **overrides})


def batch(*sizes):
    torch.manual_seed(0)
    return nested_tensor_from_tensor_list([torch.randn(3, h, w) for h, w in sizes])


def deformable_sine(mask: torch.Tensor, num_pos_feats: int) -> torch.Tensor:
    """Deformable-DETR's sine encoding, written out from its formula: positions counted from 1 over
    valid pixels, shifted by -0.5, divided by the last valid count (+1e-6) and scaled by 2*pi."""
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    channels = []
    for embed in (y, x):
        for i in range(num_pos_feats):
            angle = embed / 10000 ** (2 * (i // 2) / num_pos_feats)
            channels.append(angle.sin() if i % 2 == 0 else angle.cos())
    return torch.stack(channels, dim=1)


@pytest.mark.parametrize(
    ("kind", "name", "levels", "channels", "strides"),
    [
        ("torchvision", "resnet50", [2, 3, 4], [512, 1024, 2048], [8, 16, 32]),
        ("torchvision", "resnet18", [1, 3], [64, 256], [4, 16]),
        ("groupnorm", "resnet18", [2, 3, 4], [128, 256, 512], [8, 16, 32]),
        ("groupnorm", "resnet18", [2], [128], [8]),
        ("timm", "resnet18", [2, 3, 4], [128, 256, 512], [8, 16, 32]),
        pytest.param("timm", "convnext_atto", [2, 3, 4], [80, 160, 320], [8, 16, 32], marks=pytest.mark.slow),
    ],
)
def test_levels_give_names_channels_strides_and_sizes(kind, name, levels, channels, strides):
    joiner = joiner_of(kind, name, levels)
    images = batch((128, 160), (96, 64))
    out = joiner[0](images)
    assert list(out) == [str(i) for i in range(len(levels))]
    assert [f.tensors.shape[1] for f in out.values()] == channels
    assert [tuple(f.tensors.shape[-2:]) for f in out.values()] == [(128 // s, 160 // s) for s in strides]
    assert joiner.strides == strides and joiner.num_channels == channels and joiner.feature_channels == channels
    _features, positions = joiner(images)
    assert [p.shape for p in positions] == [(2, 64, 128 // s, 160 // s) for s in strides]


@pytest.mark.parametrize("kind", ["torchvision", "groupnorm", "timm"])
def test_body_is_cut_after_the_deepest_level(kind):
    joiner = joiner_of(kind, "resnet18", [1, 2])
    names = {name.split(".")[0] for name, _ in joiner[0].body.named_parameters()}
    assert "layer2" in names and "layer3" not in names and "layer4" not in names


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_dilation_halves_the_last_stride(kind):
    joiner = joiner_of(kind, "resnet50", [2, 3, 4], dilation=True)
    features, _ = joiner(batch((128, 128)))
    assert joiner.strides == [8, 16, 16]
    assert [f.tensors.shape[-1] for f in features] == [16, 8, 8]


def test_layers_2_to_4_keep_detrs_265_body_keys_and_freezing():
    joiner = joiner_of("torchvision", "resnet50", [2, 3, 4])
    keys = [key for key in joiner.state_dict() if key.startswith("0.body.")]
    assert len(keys) == 265
    trainable = {name.split(".")[2] for name, p in joiner.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}


def test_detr_spellings_keep_an_int_num_channels():
    four = build_backbone({"backbone": {"name": "resnet50", "return_interm_layers": True}})
    one = build_backbone({"backbone": {"name": "resnet50", "main_layer": -2}})
    assert four.num_channels == 2048 and four.strides == [4, 8, 16, 32]
    assert one.num_channels == 1024 and one.strides == [16]


@pytest.mark.parametrize(
    ("levels", "extra", "fragment"),
    [
        ([3, 2], {}, "backbone.levels=[3, 2] must be increasing stage numbers in 1..4"),
        ([0, 1], {}, "backbone.levels=[0, 1] must be increasing"),
        ([], {}, "backbone.levels=[] must be increasing"),
        ([2, 3, 4], {"return_interm_layers": True}, "backbone.levels=[2, 3, 4] replaces return_interm_layers=True"),
        ([4], {"main_layer": -2}, "main_layer=-2"),
    ],
)
def test_bad_levels_are_named(levels, extra, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        BackboneConfig(levels=levels, **extra)


# --- Deformable-DETR's build_backbone(args) --------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "strides", "channels"),
    [
        ({}, [8, 16, 32], [512, 1024, 2048]),
        pytest.param({"dilation": True}, [8, 16, 16], [512, 1024, 2048], marks=pytest.mark.slow),
        ({"num_feature_levels": 1}, [32], [2048]),
        pytest.param({"num_feature_levels": 1, "masks": True}, [8, 16, 32], [512, 1024, 2048], marks=pytest.mark.slow),
    ],
)
def test_deformable_args_give_deformables_joiner(overrides, strides, channels):
    joiner = build_backbone(deformable_args(hidden_dim=32, **overrides))
    assert joiner.strides == strides and joiner.num_channels == channels
    # DETR's freezing rule and the 265 ResNet-50 body keys whatever the level count
    assert len([key for key in joiner.state_dict() if key.startswith("0.body.")]) == 265
    images = batch((160, 128), (96, 112))
    features, positions = joiner(images)
    assert list(joiner[0](images)) == [str(i) for i in range(len(strides))]
    for feature, position, stride, width in zip(features, positions, strides, channels):
        size = (math.ceil(160 / stride), math.ceil(128 / stride))
        assert feature.tensors.shape == (2, width, *size)
        expected_mask = F.interpolate(images.mask[None].float(), size=size).to(torch.bool)[0]
        assert torch.equal(feature.mask, expected_mask)
        torch.testing.assert_close(position, deformable_sine(expected_mask, 16), rtol=0, atol=1e-5)


def test_deformable_learned_encoding_and_detr_args_unchanged():
    learned = build_position_encoding(deformable_args(position_embedding="learned", hidden_dim=64))
    assert learned.row_embed.weight.shape == (50, 32)
    detr = build_backbone(
        Namespace(
            backbone="resnet50", lr_backbone=1e-5, masks=True, dilation=False, position_embedding="sine", hidden_dim=32
        )
    )
    assert detr.num_channels == 2048 and detr.strides == [4, 8, 16, 32] and detr[1].offset == 0.0
