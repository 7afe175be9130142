"""D-FINE's PP-HGNetV2 B0..B5 as timm's hgnetv2_b0..b5: the key map of its weights, and its recipes in the presets."""

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from detr_backbone import NestedTensor
from detr_backbone.backbones.hgnetv2 import hgnetv2_to_timm

from .test_resnet_vd import preset

# Keys and shapes of D-FINE's own HGNetv2("B0", use_lab=True) (live BatchNorm) and HGNetv2("B4") (frozen BatchNorm)
DFINE_KEYS = json.loads((Path(__file__).parent / "data" / "dfine_hgnetv2_keys.json").read_text())


def randomised(model: nn.Module) -> nn.Module:
    """Random weights, BatchNorm statistics and learnable affines, scaled so activations stay near 1."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_var", "lab.scale")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                fan_in = tensor[0].numel() if tensor.dim() > 1 else 4
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)
    return model.eval()


# D-FINE's name -> timm's features body's, written out by hand: the learnable affines, the 2x2 stem convolutions,
# the light blocks and the numbered aggregation
SAMPLES = {
    "B0": (
        ("stem.stem1.lab.scale", "stem.stem1.lab.scale"),
        ("stem.stem2a.conv.weight", "stem.stem2a.conv.weight"),
        ("stages.2.blocks.1.layers.2.conv2.lab.bias", "stages_2.blocks.1.layers.2.conv2.lab.bias"),
        ("stages.3.blocks.0.aggregation.1.bn.running_var", "stages_3.blocks.0.aggregation.1.bn.running_var"),
    ),
    "B4": (
        ("stem.stem2b.conv.weight", "stem.stem2b.conv.weight"),
        ("stages.1.downsample.bn.running_mean", "stages_1.downsample.bn.running_mean"),
        ("stages.2.blocks.2.layers.5.conv1.conv.weight", "stages_2.blocks.2.layers.5.conv1.conv.weight"),
        ("stages.3.blocks.0.aggregation.0.bn.weight", "stages_3.blocks.0.aggregation.0.bn.weight"),
    ),
}


@pytest.mark.parametrize("size", ["B0", "B4"])
def test_dfine_layout_loads_strictly_into_its_preset(size):
    """The keys and shapes D-FINE's own B0 and B4 save fill their presets' bodies exactly."""
    state = {key: torch.rand(shape) for key, shape in DFINE_KEYS[size].items()}
    backbone = preset(f"hgnetv2_{size.lower()}")
    backbone.load_state_dict(hgnetv2_to_timm(state, prefix_out="body."), strict=True)
    ours = backbone.state_dict()
    for dfine, timm_name in SAMPLES[size]:
        assert torch.equal(ours[f"body.{timm_name}"], state[f"backbone.{dfine}"])


def test_an_unknown_hgnetv2_key_is_named():
    with pytest.raises(ValueError, match=r"'backbone.stem.stem1.act.alpha' is not a tensor of RT-DETR's or D-FINE's"):
        hgnetv2_to_timm({"backbone.stem.stem1.act.alpha": torch.zeros(1)})


@pytest.mark.parametrize(
    "size", ["b0", pytest.param("b2", marks=pytest.mark.slow), pytest.param("b4", marks=pytest.mark.slow)]
)
def test_timm_weights_under_dfine_names_come_back_with_their_outputs(size):
    """timm's own classifier (its stem and stages carry D-FINE's module names) saved under D-FINE's keys: every tensor
    of the preset has exactly one D-FINE name, and the mapped state reproduces timm's stage outputs."""
    classifier = randomised(timm.create_model(f"hgnetv2_{size}"))
    released = {
        f"backbone.{key}": value for key, value in classifier.state_dict().items() if not key.startswith("head.")
    }
    tensors = {key: value for key, value in released.items() if not key.endswith("num_batches_tracked")}
    if size.upper() in DFINE_KEYS:  # the same keys and shapes as D-FINE's own model (which may freeze its norms)
        layout = {key: shape for key, shape in DFINE_KEYS[size.upper()].items() if shape}
        assert {key: list(value.shape) for key, value in tensors.items()} == layout
    backbone = preset(f"hgnetv2_{size}", "backbone.levels=[1,2,3,4]")
    ours = {key for key in backbone.state_dict() if not key.endswith("num_batches_tracked")}
    names = {next(iter(hgnetv2_to_timm({key: value}, prefix_out="body."))): key for key, value in tensors.items()}
    assert set(names) == ours and len(names) == len(tensors)  # one D-FINE name a tensor, none left over
    assert any(key.endswith("lab.scale") for key in names) == (size in ("b0", "b2"))
    backbone.load_state_dict(hgnetv2_to_timm(released, prefix_out="body."), strict=True)
    image = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = classifier.forward_intermediates(image, intermediates_only=True)
        got = [
            level.tensors for level in backbone.eval()(NestedTensor(image, torch.zeros(1, 160, 160).bool())).values()
        ]
    assert len(got) == len(expected) == 4
    for level, (ours_map, timm_map) in enumerate(zip(got, expected)):
        torch.testing.assert_close(ours_map, timm_map, rtol=1e-4, atol=1e-5, msg=f"level {level + 1}")


# D-FINE's configs/dfine/dfine_hgnetv2_{n,s,m,l,x}_coco.yml: N and S on B0, M on B2 (use_lab, freeze_at -1,
# freeze_norm False), L on B4 and X on B5 (no lab, freeze_at 0 with freeze_stem_only, freeze_norm True)
RECIPES = {"b0": (True, False), "b2": (True, False), "b4": (False, True), "b5": (False, True)}


@pytest.mark.parametrize(
    "size", ["b0", pytest.param("b2", marks=pytest.mark.slow), "b4", pytest.param("b5", marks=pytest.mark.slow)]
)
def test_presets_carry_dfine_recipes(size):
    use_lab, frozen_stem_and_norms = RECIPES[size]
    backbone = preset(f"hgnetv2_{size}")
    labs = [name for name, _ in backbone.body.named_parameters() if ".lab." in name]
    assert bool(labs) == use_lab
    trained = {name.partition(".")[0] for name, p in backbone.body.named_parameters() if p.requires_grad}
    live_norms = [m for m in backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    if frozen_stem_and_norms:
        assert trained == {"stages_0", "stages_1", "stages_2", "stages_3"} and not live_norms
    else:
        assert all(p.requires_grad for p in backbone.parameters()) and "stem" in trained
        before = live_norms[0].running_mean.clone()
        backbone.train()(NestedTensor(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64).bool()))
        assert not torch.equal(live_norms[0].running_mean, before)  # batch statistics move


def test_b0_preset_counts_dfine_learnable_affines():
    """One affine (scale, bias) after every activation: as many as D-FINE's B0 holds."""
    backbone = preset("hgnetv2_b0")
    dfine_labs = sum(key.endswith("lab.scale") for key in DFINE_KEYS["B0"])
    assert sum(name.endswith("lab.scale") for name, _ in backbone.body.named_parameters()) == dfine_labs == 30
