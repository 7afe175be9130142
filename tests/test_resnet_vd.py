"""RT-DETR's PResNet-vd as timm's ResNet-D: Hugging Face's RTDetrResNetBackbone as the oracle, the reference
checkpoint layout (tests/data/presnet_keys.json, written from RT-DETRv2's own PResNet) loading strictly, the
presets' freezing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from detr_backbone import JoinerConfig, NestedTensor, ResNetVdBackbone, build_backbone
from detr_backbone.backbones.hgnetv2 import hgnetv2_to_timm
from detr_backbone.backbones.resnet_vd import hugging_face_resnet_to_timm, presnet_to_timm
from detr_backbone.training import validated

from .jobs import compose_config

PRESNET_KEYS = json.loads((Path(__file__).parent / "data" / "presnet_keys.json").read_text())
# RTDetrResNetConfig arguments of each depth: R50's are its defaults, R18's those of RT-DETRv2-R18's Hugging Face config
HUGGING_FACE_CONFIGS = {
    "resnet18d": {"layer_type": "basic", "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512]},
    "resnet34d": {"layer_type": "basic", "depths": [3, 4, 6, 3], "hidden_sizes": [64, 128, 256, 512]},
    "resnet50d": {},
    "resnet101d": {"depths": [3, 4, 23, 3]},
}
SLOW_DEPTHS = ("resnet34d", "resnet101d")  # the same blocks as R18 and R50, more of them


def depths(*names: str):
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_DEPTHS else name for name in names]


def images(height: int = 97, width: int = 131) -> NestedTensor:
    # an odd size: the average-pool shortcuts' ceil_mode decides the last row and column
    torch.manual_seed(1)
    return NestedTensor(torch.randn(1, 3, height, width), torch.zeros(1, height, width, dtype=torch.bool))


def randomise_norms(model: nn.Module) -> None:
    """BatchNorm statistics and affine maps away from the identity, so a misplaced norm shows."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor, low, high in (
                (module.weight, 0.5, 1.0),
                (module.bias, -0.2, 0.2),
                (module.running_mean, -0.2, 0.2),
                (module.running_var, 0.5, 2.0),
            ):
                tensor.data.uniform_(low, high, generator=generator)


def features(backbone: ResNetVdBackbone) -> list[torch.Tensor]:
    with torch.no_grad():
        return [level.tensors for level in backbone.eval()(images()).values()]


@pytest.mark.parametrize("name", depths(*HUGGING_FACE_CONFIGS))
def test_hugging_face_rtdetr_resnet_loads_strictly_and_gives_its_feature_maps(name):
    from transformers import RTDetrResNetBackbone, RTDetrResNetConfig

    torch.manual_seed(0)
    reference = RTDetrResNetBackbone(RTDetrResNetConfig(**HUGGING_FACE_CONFIGS[name], out_indices=[2, 3, 4])).eval()
    randomise_norms(reference)
    ours = ResNetVdBackbone(name, levels=[2, 3, 4])
    state = reference.state_dict()
    mapped = hugging_face_resnet_to_timm(state, prefix_in="", prefix_out="body.")
    assert len(mapped) == sum(not key.endswith("num_batches_tracked") for key in state)
    ours.load_state_dict(mapped, strict=True)
    with torch.no_grad():
        expected = reference(images().tensors).feature_maps
    got = features(ours)
    assert [tuple(f.shape) for f in got] == [tuple(f.shape) for f in expected]
    assert [f.shape[-2:] for f in got] == [(13, 17), (7, 9), (4, 5)]  # 97x131 at strides 8/16/32, rounded up
    for ours_map, reference_map in zip(got, expected):
        torch.testing.assert_close(ours_map, reference_map, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", depths(*PRESNET_KEYS))
def test_the_reference_checkpoint_layout_loads_strictly(name):
    """Every tensor RT-DETRv2's PResNet saves (live BatchNorm's counters for R18/R34, as their recipe trains them)
    finds its place, and every tensor of ours is given."""
    layout = PRESNET_KEYS[name]
    state = {key: torch.rand(shape) for key, shape in layout.items()}
    detector = nn.Module()  # the Joiner where a detector holds it: keys backbone.0.body.*
    detector.backbone = build_backbone(
        {"backbone": {"_target_": "detr_backbone.ResNetVdBackbone", "name": name, "levels": [2, 3, 4]}}
    )
    detector.load_state_dict(presnet_to_timm(state), strict=True)
    ours = detector.state_dict()
    plain = "backbone.res_layers.0.blocks.0.short.conv.weight"  # 18/34: the projection grafted onto timm's block
    assert torch.equal(ours["backbone.0.body.layer1.0.downsample.1.weight"], state[plain])
    pooled = "backbone.res_layers.3.blocks.0.short.conv.norm.running_var"
    assert torch.equal(ours["backbone.0.body.layer4.0.downsample.2.running_var"], state[pooled])
    stem = "backbone.conv1.conv1_3.norm.bias"
    assert torch.equal(ours["backbone.0.body.bn1.bias"], state[stem])


def test_the_grafted_projection_starts_as_the_identity():
    """resnet18d's own weights (ImageNet's, here random ones) give timm's maps until the projection trains."""
    torch.manual_seed(0)
    plain = timm.create_model("resnet18d", features_only=True, out_indices=(2, 3, 4))
    randomise_norms(plain)
    ours = ResNetVdBackbone("resnet18d", levels=[2, 3, 4])
    missing, unexpected = ours.body.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == [
        f"layer1.0.downsample.{k}" for k in ("1.weight", "2.bias", "2.running_mean", "2.running_var", "2.weight")
    ]
    assert not unexpected
    with torch.no_grad():
        expected = plain.eval()(images().tensors)
    for ours_map, plain_map in zip(features(ours), expected):
        # the grafted BatchNorm divides by sqrt(1 + eps)
        torch.testing.assert_close(ours_map, plain_map, rtol=2e-5, atol=1e-5)


def test_unknown_keys_and_names_fail_naming_them():
    with pytest.raises(
        ValueError, match=r"'backbone.res_layers.0.blocks.0.branch2z.conv.weight' is not a tensor of RT-DETR's PResNet"
    ):
        presnet_to_timm({"backbone.res_layers.0.blocks.0.branch2z.conv.weight": torch.zeros(1)})
    assert (
        presnet_to_timm({"encoder.input_proj.0.weight": torch.zeros(1)}) == {}
    )  # the rest of a detector is the head's
    with pytest.raises(
        ValueError, match=r"backbone.name='resnet18' is not a PResNet-vd; valid names: resnet18d, resnet34d"
    ):
        ResNetVdBackbone("resnet18")


def preset(name: str, *overrides: str) -> nn.Module:
    config = validated(compose_config(f"backbone={name}", "backbone.levels=[2,3,4]", *overrides))
    return build_backbone(JoinerConfig(config.backbone, config.position, lr_backbone=1e-5))[0]


def test_r18_preset_trains_everything_with_live_batch_norm():
    backbone = preset("resnet18vd")
    assert all(parameter.requires_grad for parameter in backbone.parameters())
    norms = [m for m in backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 23  # 3 in the stem, 2 a block, one a projection shortcut (4 of them)
    before = norms[0].running_mean.clone()
    backbone.train()(images(64, 64))
    assert not torch.equal(norms[0].running_mean, before)  # batch statistics move


def test_r50_preset_freezes_the_stem_and_every_batch_norm():
    backbone = preset("resnet50vd")
    trained = {name.partition(".")[0] for name, p in backbone.body.named_parameters() if p.requires_grad}
    assert trained == {"layer1", "layer2", "layer3", "layer4"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.body.modules())
    assert not any(name.rpartition(".")[2].startswith("bn") for name, _ in backbone.body.named_parameters())


def test_live_batch_norm_is_frozen_in_the_stages_that_do_not_train():
    backbone = preset("resnet18vd", "backbone.trainable_layers=3")
    live = {name.partition(".")[0] for name, m in backbone.body.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert live == {"layer2", "layer3", "layer4"}
    frozen_stats = backbone.body.layer1[0].bn1.running_mean.clone()
    backbone.train()(images(64, 64))
    assert torch.equal(backbone.body.layer1[0].bn1.running_mean, frozen_stats)


def test_freeze_norm_is_checked():
    with pytest.raises(ValueError, match=r"backbone.freeze_norm=False applies to backbones timm builds only"):
        JoinerConfig.from_args({"backbone": {"name": "resnet50", "freeze_norm": False}})
    with pytest.raises(ValueError, match=r"backbone.freeze_norm=false keeps BatchNorms live, backbone.freeze=true"):
        JoinerConfig.from_args({"backbone": {"kind": "timm", "freeze_norm": False, "freeze": True}})


HGNETV2_KEYS = json.loads((Path(__file__).parent / "data" / "hgnetv2_keys.json").read_text())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n != "L" else n for n in HGNETV2_KEYS])
def test_rtdetr_hgnetv2_layout_loads_strictly_into_its_timm_preset(name):
    """RT-DETRv2's HGNetv2 L/X/H (keys and shapes from its own code) are timm's hgnetv2_b4/b5/b6."""
    layout = HGNETV2_KEYS[name]
    state = {key: torch.rand(shape) for key, shape in layout.items()}
    backbone = preset(f"hgnetv2_{name.lower()}")
    backbone.load_state_dict(hgnetv2_to_timm(state, prefix_out="body."), strict=True)
    ours = backbone.state_dict()
    stem = "backbone.stem.stem2a.conv.1.weight"  # RT-DETR's padded 2x2 convolution
    assert torch.equal(ours["body.stem.stem2a.conv.weight"], state[stem])
    squeeze = "backbone.stages.2.blocks.0.aggregation_squeeze_conv.bn.running_var"
    assert torch.equal(ours["body.stages_2.blocks.0.aggregation.0.bn.running_var"], state[squeeze])


def test_hgnetv2_preset_freezes_the_stem_and_every_batch_norm():
    backbone = preset("hgnetv2_l")
    assert backbone.strides == [8, 16, 32] and backbone.num_channels == [512, 1024, 2048]
    trained = {name.partition(".")[0] for name, p in backbone.body.named_parameters() if p.requires_grad}
    assert trained == {"stages_0", "stages_1", "stages_2", "stages_3"}  # the stem frozen (freeze_at 0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.body.modules())
