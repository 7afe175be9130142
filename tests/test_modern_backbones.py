"""Transformer backbones from timm at DETR's image sizes: ViT, DeiT, DINOv2, EVA, Swin and ConvNeXt, tiny ones
built from timm's own code (no weights); the feature pyramid of single-stride models, padding in attention,
freezing by transformer block and layer-wise learning-rate decay, and a Deformable DETR training on a ViT."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from detr_backbone import (
    TimmBackbone,
    build_backbone,
    joiner_parameter_groups,
    load_checkpoint,
    nested_tensor_from_tensor_list,
)
from detr_backbone.backbones.feature_pyramid import SimpleFeaturePyramid
from detr_backbone.config import JoinerConfig
from detr_backbone.training.job import Job, validated

from .jobs import TINY, compose_config

TINY_VIT = {"depth": 3, "embed_dim": 32, "num_heads": 2, "img_size": 32}
TINY_MODELS = {
    "vit_small_patch16_224": TINY_VIT,
    "deit_tiny_patch16_224": TINY_VIT,
    "vit_small_patch14_dinov2": {**TINY_VIT, "img_size": 28},
    "eva02_tiny_patch14_224": {**TINY_VIT, "img_size": 28},
    "swin_tiny_patch4_window7_224": {"depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": (1, 1, 1, 1)},
    "convnext_tiny": {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)},
}
TRAINED_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32, "drop_path_rate": 0.1}
# 90 x 117 and 75 x 100: multiples of neither 32 nor 14 (nor of 16 or 4)
SIZES = ((90, 117), (75, 100))


def batch(*sizes):
    generator = torch.Generator().manual_seed(0)
    return nested_tensor_from_tensor_list([torch.rand(3, h, w, generator=generator) for h, w in sizes])


def ceil_div(size: int, stride: int) -> int:
    return -(-size // stride)


@pytest.mark.parametrize(
    ("name", "strides", "channels"),
    [
        ("vit_small_patch16_224", [8, 16, 32], [256, 256, 256]),
        ("deit_tiny_patch16_224", [8, 16, 32], [256, 256, 256]),
        ("vit_small_patch14_dinov2", [7, 14, 28], [256, 256, 256]),
        ("eva02_tiny_patch14_224", [7, 14, 28], [256, 256, 256]),
        ("swin_tiny_patch4_window7_224", [8, 16, 32], [32, 64, 128]),
        ("convnext_tiny", [8, 16, 32], [16, 32, 64]),
    ],
)
def test_levels_2_to_4_at_sizes_that_are_no_multiple_of_the_patch(name, strides, channels):
    backbone = TimmBackbone(name, levels=[2, 3, 4], kwargs=TINY_MODELS[name]).eval()
    assert backbone.strides == strides and backbone.num_channels == channels
    images = batch(*SIZES)
    with torch.no_grad():
        out = backbone(images)
    height, width = SIZES[0]
    patch = backbone.patch  # transformers pad to their patch size; a CNN's strided convolutions round down
    padded = (ceil_div(height, patch) * patch, ceil_div(width, patch) * patch)
    for feature, stride, count in zip(out.values(), strides, channels):
        expected = (ceil_div(padded[0], stride), ceil_div(padded[1], stride))
        if patch == 1:
            expected = (height // stride, width // stride)
        if name.startswith("vit_small_patch14") or name.startswith("eva"):  # 14 * 2 ** k: the pyramid's own rounding
            native = (padded[0] // patch, padded[1] // patch)
            expected = {7: (native[0] * 2, native[1] * 2), 14: native, 28: tuple(ceil_div(n, 2) for n in native)}[
                stride
            ]
        assert feature.tensors.shape == (2, count, *expected)
        assert feature.mask.shape == (2, *expected) and feature.tensors.isfinite().all()
        # the masks are DETR's nearest resize of the pixel mask, padded to the patch size as the images were
        pixel_mask = F.pad(images.mask, (0, padded[1] - width, 0, padded[0] - height), value=True)
        assert torch.equal(feature.mask, F.interpolate(pixel_mask[None].float(), size=expected).bool()[0])
    assert out["1"].mask[1].any()


def test_swin_maps_come_back_channels_first_as_its_feature_info_says():
    backbone = TimmBackbone(
        "swin_tiny_patch4_window7_224", levels=[1, 2, 3, 4], kwargs=TINY_MODELS["swin_tiny_patch4_window7_224"]
    )
    backbone.eval()  # no stochastic depth
    assert backbone.body.output_fmt == "NHWC" and backbone.nhwc
    images = batch((64, 96))
    with torch.no_grad():
        raw = backbone.body(images.tensors)
        out = backbone(images)
    for native, feature, count in zip(raw, out.values(), [16, 32, 64, 128]):
        assert native.shape[-1] == count and feature.tensors.shape[1] == count
        assert torch.equal(feature.tensors, native.permute(0, 3, 1, 2))


def test_the_pyramid_makes_strides_8_to_64_from_a_stride_16_map():
    pyramid = SimpleFeaturePyramid(32, 16, [2, 3, 4, 5], channels=8)
    out = pyramid(torch.rand(1, 32, 6, 9))
    assert pyramid.strides == [8, 16, 32, 64] and pyramid.channels == [8] * 4
    assert [tuple(level.shape) for level in out] == [(1, 8, 12, 18), (1, 8, 6, 9), (1, 8, 3, 5), (1, 8, 2, 3)]
    with pytest.raises(ValueError, match=r"levels=\[1, 2\] must be increasing pyramid levels in 2..5"):
        SimpleFeaturePyramid(32, 16, [1, 2])


def test_a_vit_without_levels_gives_detr_its_stride_16_map_alone():
    joiner = build_backbone(
        {"backbone": {"kind": "timm", "name": "vit_small_patch16_224", "kwargs": TINY_VIT}, "hidden_dim": 16}
    )
    features, positions = joiner(batch(*SIZES))
    assert joiner.num_channels == 32 and joiner.strides == [16] and joiner[0].pyramid is None
    assert features[0].tensors.shape == (2, 32, 6, 8) and positions[0].shape == (2, 16, 6, 8)


def test_padded_patches_are_left_out_of_vit_attention():
    # the same image alone and beside a larger one: equal wherever the position embeddings are the same grid
    backbone = TimmBackbone("vit_small_patch16_224", kwargs={**TINY_VIT, "img_size": 64}).eval()
    image = torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(1))
    alone = nested_tensor_from_tensor_list([image, torch.rand(3, 64, 64)])  # padded to 64 x 64: one grid for both
    with torch.no_grad():
        masked = backbone(alone)["0"].tensors[0, :, :3, :3]
        backbone.attention_mask = False
        unmasked = backbone(alone)["0"].tensors[0, :, :3, :3]
        backbone.attention_mask = True
        # what attention saw of the padding is gone: the image's valid patches match a run over its valid patches
        model = backbone.body.model
        tokens = model._pos_embed(model.patch_embed(F.pad(image, (0, 24, 0, 16))[None]))
        keep = torch.zeros(4, 4, dtype=torch.bool)
        keep[:3, :3] = True
        tokens = torch.cat([tokens[:, :1], tokens[:, 1:][:, keep.flatten()]], dim=1)
        for block in model.blocks:
            tokens = block(tokens)
        reference = tokens[:, 1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)[0]
    torch.testing.assert_close(masked, reference, rtol=1e-4, atol=1e-5)
    assert (unmasked - reference).abs().max() > 1e-3


def test_vit_trainable_layers_counts_transformer_blocks():
    backbone = TimmBackbone("vit_small_patch16_224", levels=[3], trainable_layers=2, kwargs=TINY_VIT)
    trained = {name.split(".")[2] for name, p in backbone.body.named_parameters() if p.requires_grad}
    assert trained == {"1", "2"}  # blocks 1 and 2 of 0..2; embeddings and block 0 frozen
    assert all(p.requires_grad for p in backbone.pyramid.parameters())
    with pytest.raises(
        ValueError, match=r"trainable_layers=5 must be in 0..4 for 'vit_small_patch16_224' \(3 transformer blocks"
    ):
        TimmBackbone("vit_small_patch16_224", trainable_layers=5, kwargs=TINY_VIT)


def test_layer_decay_gives_each_block_its_lr_and_exempts_norms_biases_and_tokens():
    cfg = JoinerConfig.from_args(
        {
            "backbone": {"kind": "timm", "name": "vit_small_patch16_224", "levels": [2, 3, 4], "kwargs": TINY_VIT},
            "lr_backbone": 1e-4,
        }
    )
    cfg.backbone.lr_layer_decay = 0.5
    joiner = build_backbone(cfg)
    names = {id(p): n.removeprefix("model.") for n, p in joiner[0].body.named_parameters()}
    groups = joiner_parameter_groups(joiner, cfg, head_lr=1e-3)
    lrs = {
        names[id(p)]: (g["lr"], g.get("weight_decay")) for g in groups if g["name"] != "pyramid" for p in g["params"]
    }
    n = 3
    assert lrs["pos_embed"] == (pytest.approx(1e-4 * 0.5 ** (n + 1)), 0.0)
    assert lrs["cls_token"] == (pytest.approx(1e-4 * 0.5 ** (n + 1)), 0.0)
    assert lrs["patch_embed.proj.weight"] == (pytest.approx(1e-4 * 0.5 ** (n + 1)), None)
    assert lrs["patch_embed.proj.bias"][1] == 0.0
    for i in range(n):
        assert lrs[f"blocks.{i}.attn.qkv.weight"] == (pytest.approx(1e-4 * 0.5 ** (n - i)), None)
        assert lrs[f"blocks.{i}.norm1.weight"] == (pytest.approx(1e-4 * 0.5 ** (n - i)), 0.0)
        assert lrs[f"blocks.{i}.mlp.fc1.bias"] == (pytest.approx(1e-4 * 0.5 ** (n - i)), 0.0)
    assert set(lrs) == set(names.values())  # every body tensor in exactly one group
    (pyramid,) = [g for g in groups if g["name"] == "pyramid"]
    assert pyramid["lr"] == 1e-3 and len(pyramid["params"]) == len(list(joiner[0].pyramid.parameters()))


def test_swin_layer_decay_counts_blocks_across_stages():
    cfg = JoinerConfig.from_args(
        {
            "backbone": {
                "kind": "timm",
                "name": "swin_tiny_patch4_window7_224",
                "kwargs": TINY_MODELS["swin_tiny_patch4_window7_224"],
                "trainable_layers": 5,
                "lr_layer_decay": 0.5,
            },
            "lr_backbone": 1.0,
        }
    )
    joiner = build_backbone(cfg)
    names = {id(p): n for n, p in joiner[0].body.named_parameters()}
    lrs = {names[id(p)]: g["lr"] for g in joiner_parameter_groups(joiner, cfg) for p in g["params"]}
    assert lrs["patch_embed.proj.weight"] == 0.5**5
    assert [lrs[f"layers_{k}.blocks.0.attn.qkv.weight"] for k in range(4)] == [0.5**4, 0.5**3, 0.5**2, 0.5]
    assert lrs["layers_1.downsample.reduction.weight"] == 0.5**3  # patch merging goes with the stage it starts


def test_bad_transformer_options_fail_in_one_line():
    with pytest.raises(ValueError, match=r"backbone.lr_layer_decay=1.5 must be null \(off\) or in \(0, 1\]"):
        JoinerConfig.from_args({"backbone": {"kind": "timm", "lr_layer_decay": 1.5}})
    with pytest.raises(ValueError, match=r"backbone.kwargs=\{'depth': 2\} applies to backbones timm builds only"):
        JoinerConfig.from_args({"backbone": {"name": "resnet18", "kwargs": {"depth": 2}}})
    with pytest.raises(
        ValueError, match=r"timm model 'vit_small_patch16_224' does not take backbone.kwargs=\{'depths': 2\}"
    ):
        TimmBackbone("vit_small_patch16_224", kwargs={"depths": 2})
    with pytest.raises(ValueError, match=r"timm model 'vit_small_patch16_224' takes only \(32, 32\) images"):
        TimmBackbone("vit_small_patch16_224", kwargs={**TINY_VIT, "dynamic_img_size": False})


@pytest.mark.slow
def test_deformable_detr_trains_a_few_steps_on_a_vit(tmp_path):
    # python train.py model=deformable_detr_small backbone=timm backbone.name=vit_small_patch16_224, made tiny
    config = validated(
        compose_config(
            *TINY,
            "model=deformable_detr_small",
            "model.enc_layers=1",
            "model.dec_layers=1",
            "model.dim_feedforward=64",
            "backbone=timm",
            "backbone.name=vit_small_patch16_224",
            *(f"+backbone.kwargs.{key}={value}" for key, value in TRAINED_VIT.items()),
            "backbone.lr_layer_decay=0.75",
            "trainer.fast_dev_run=2",
            "test_after_fit=false",
            "callbacks.predictions.enabled=false",
        )
    )
    run = Job(config, tmp_path)
    joiner = run.module.detector.backbone
    assert joiner.strides == [8, 16, 32] and joiner.num_channels == [256, 256, 256]
    before = {n: p.detach().clone() for n, p in joiner.named_parameters() if p.requires_grad}
    run.run()
    assert torch.isfinite(run.trainer.callback_metrics["train/loss"])
    moved = {n for n, p in joiner.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any(n.startswith("0.body.model.blocks.0.") for n in moved) and any(n.startswith("0.pyramid.") for n in moved)


def test_a_timm_models_own_weights_file_loads_into_its_backbone(tmp_path):
    # backbone.checkpoint=<file>: the file timm's own model writes (a DINOv2 / EVA .safetensors kept on disk)
    source = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=3, **TINY_MODELS["vit_small_patch14_dinov2"]
    )
    save_file(source.state_dict(), tmp_path / "dinov2.safetensors")
    config = {
        "backbone": {
            "kind": "timm",
            "name": "vit_small_patch14_dinov2",
            "levels": [2, 3, 4],
            "kwargs": TINY_MODELS["vit_small_patch14_dinov2"],
            "checkpoint": str(tmp_path / "dinov2.safetensors"),
        }
    }
    joiner = build_backbone(config)
    body = joiner[0].body.model.state_dict()
    assert body and all(torch.equal(value, source.state_dict()[key]) for key, value in body.items())
    report = load_checkpoint(joiner, tmp_path / "dinov2.safetensors")
    assert report.loaded == len(body) and sorted(report.skipped) == [
        "body.head.bias",
        "body.head.weight",
        "body.norm.bias",
        "body.norm.weight",
    ]
