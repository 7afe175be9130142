"""Backbones: a CNN body whose feature maps come back paired with the padding mask resized to each.

All kinds share ``BackboneBase`` (freezing, level selection, mask downsampling); the subclasses
only build the body: a torchvision ResNet with frozen BatchNorm (DETR), the same ResNet with
GroupNorm (MDETR's ``resnet50-gn``), or any timm model that offers ``features_only``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.models._features import FeatureGetterNet
from timm.utils.model import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from ..nested_tensor import MaskedImages, NestedTensor, padding_mask
from ..weights import explain_download_errors
from .feature_pyramid import PYRAMID_LEVELS, SimpleFeaturePyramid
from .freezing import NUM_STAGES, detr_trainable_layers, freeze_stages
from .frozen_batch_norm import FrozenBatchNorm2d
from .layer_decay import transformer_blocks
from .timm_image_size import (
    any_size_options,
    is_single_stride,
    meta_model,
    pad_to_multiple,
    patch_size,
    takes_attention_mask,
    token_attention_mask,
)

TORCHVISION_RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
LEVELS = 4


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, in the ``norm_layer(num_channels)`` form torchvision's ResNet expects."""

    def __init__(self, num_channels: int, num_groups: int = 32, **kwargs):
        super().__init__(num_groups, num_channels, **kwargs)


def select_levels(
    return_interm_layers: bool, main_layer: int = -1, levels: Sequence[int] | None = None, count: int = LEVELS
) -> list[int]:
    """The feature levels a backbone returns, as indices 0..count-1 of the ``count`` it offers (ours:
    the last four, a ResNet's layer1..layer4).

    ``levels`` numbers them from 1 (Deformable-DETR's [2, 3, 4] is layers 2-4, strides 8/16/32);
    without it, DETR's spellings: all with ``return_interm_layers``, else ``main_layer`` alone.
    """
    if levels is not None:
        if not levels or any(not 1 <= level <= count for level in levels) or list(levels) != sorted(set(levels)):
            raise ValueError(f"levels={list(levels)} must be increasing stage numbers in 1..{count}, e.g. [2, 3, 4]")
        return [level - 1 for level in levels]
    if return_interm_layers:
        return list(range(count))
    if not -count <= main_layer < count:
        raise ValueError(
            f"main_layer must index one of the {count} feature levels ({-count}..{count - 1}), got {main_layer}"
        )
    return [main_layer % count]


def downsample_mask(mask: Tensor, size: list[int]) -> Tensor:
    """Resize a padding mask to a feature map, as DETR does (nearest interpolation)."""
    return F.interpolate(mask[None].float(), size=(size[0], size[1])).to(torch.bool)[0]


class BackboneBase(nn.Module):
    """A body returning feature maps (dict or list, shallow to deep), each returned with its mask.

    Levels are named "0", "1", ... in the order the body returns them. ``feature_channels`` and
    ``strides`` list every returned level. ``num_channels`` follows the caller's convention: DETR's
    int (the last level's channels, the map DETR's transformer reads) unless ``channel_list``, which
    gives Deformable-DETR's list, one entry per level.
    """

    def __init__(
        self,
        body: nn.Module,
        stage_modules: Sequence[str],
        trainable_layers: int,
        channels: Sequence[int],
        strides: Sequence[int],
        channel_list: bool = False,
        num_stages: int = NUM_STAGES,
    ):
        super().__init__()
        freeze_stages(body, stage_modules, trainable_layers, num_stages)
        self.body = body
        self.trainable_layers = trainable_layers
        self.feature_channels = list(channels)
        self.strides = list(strides)
        self.num_channels = list(self.feature_channels) if channel_list else self.feature_channels[-1]
        self.in_channels = next((m.in_channels for m in body.modules() if isinstance(m, nn.Conv2d)), None)
        self.channels_last = False

    def use_channels_last(self) -> None:
        """Run the body in NHWC: weights converted now, images on every call (values unchanged)."""
        self.body.to(memory_format=torch.channels_last)
        self.channels_last = True

    def forward(self, tensor_list: MaskedImages) -> dict[str, NestedTensor]:
        images, mask = padding_mask(tensor_list)
        if not torch.jit.is_scripting():
            self.check_images(images)
            images, mask = self.pad_images(images, mask)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out: dict[str, NestedTensor] = {}
        for level, feature in enumerate(self.feature_maps(images, mask)):
            out[str(level)] = NestedTensor(feature, downsample_mask(mask, feature.shape[-2:]))
        return out

    @torch.jit.unused
    def check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != (self.in_channels or images.shape[1]):
            raise ValueError(
                f"the backbone takes images of shape (batch, {self.in_channels}, height, width), got {tuple(images.shape)}"
            )

    @torch.jit.unused
    def pad_images(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The images and mask as the body needs them (transformers: padded to their patch size)."""
        return images, mask

    def feature_maps(self, images: Tensor, mask: Tensor) -> list[Tensor]:
        """The body's maps, shallow to deep (ours return exactly the selected levels); ``mask`` marks padding."""
        features = self.body(images)
        return list(features.values() if isinstance(features, dict) else features)


class Backbone(BackboneBase):
    """A torchvision ResNet with frozen BatchNorm, without avgpool and fc (DETR's ``Backbone``).

    It returns the stages ``select_levels`` picks (DETR: layer4 alone, or all four with
    ``return_interm_layers``) and the body ends at the deepest one. Given ``levels``, ``num_channels``
    is Deformable-DETR's per-level list.
    """

    norm_layer: type[nn.Module] = FrozenBatchNorm2d

    def __init__(
        self,
        name: str,
        train_backbone: bool,
        return_interm_layers: bool,
        dilation: bool,
        *,
        pretrained: bool = False,
        trainable_layers: int | None = None,
        main_layer: int = -1,
        levels: Sequence[int] | None = None,
    ):
        resnet = self.build_resnet(name, dilation, pretrained)
        selected = select_levels(return_interm_layers, main_layer, levels)
        expansion = resnet.layer1[0].expansion
        channels = [64 * expansion * 2**level for level in selected]
        strides = [16 if dilation and level == LEVELS - 1 else 4 * 2**level for level in selected]
        if trainable_layers is None:
            trainable_layers = detr_trainable_layers(train_backbone)
        # the getter drops every stage after the last one returned
        body = IntermediateLayerGetter(
            resnet, return_layers={RESNET_STAGES[level]: str(i) for i, level in enumerate(selected)}
        )
        stages = RESNET_STAGES[: selected[-1] + 1]
        super().__init__(body, stages, trainable_layers, channels, strides, channel_list=levels is not None)

    def feature_maps(self, images: Tensor, mask: Tensor) -> list[Tensor]:
        return list(self.body(images).values())  # the getter's dict, typed for TorchScript

    def build_resnet(self, name: str, dilation: bool, pretrained: bool) -> torchvision.models.ResNet:
        if name not in TORCHVISION_RESNETS:
            raise ValueError(f"unknown torchvision ResNet {name!r}; valid names: {', '.join(TORCHVISION_RESNETS)}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(
                f"dilation=true needs bottleneck blocks, which {name} does not have; "
                "use resnet50 or deeper, or dilation=false"
            )
        resnet = torchvision.models.get_model(
            name, weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=self.norm_layer
        )
        if pretrained:
            resnet.load_state_dict(self.imagenet_state_dict(name))
        return resnet

    def imagenet_state_dict(self, name: str) -> dict[str, Tensor]:
        # IMAGENET1K_V1 are the weights DETR was trained from; loaded without unpickling code.
        weights = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"]
        with explain_download_errors(f"torchvision ImageNet weights for {name}"):
            return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)


class GroupNormBackbone(Backbone):
    """A torchvision ResNet with GroupNorm(32) in every norm layer (MDETR's ``resnet50-gn``)."""

    norm_layer = GroupNorm32

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool, dilation: bool, **kwargs):
        super().__init__(
            name.removesuffix("-gn").removesuffix("_gn"), train_backbone, return_interm_layers, dilation, **kwargs
        )

    def imagenet_state_dict(self, name: str) -> dict[str, Tensor]:
        raise ValueError(
            f"torchvision has no GroupNorm ImageNet weights for {name}; set pretrained=false and "
            "pass the GroupNorm checkpoint file as backbone.checkpoint=<path>"
        )


class TimmBackbone(BackboneBase):
    """Any timm model built with ``features_only``; its BatchNorms are frozen the way timm does it.

    Levels are chosen among the last four of its ``feature_info`` as for a ResNet (``levels``
    1..4, or DETR's ``return_interm_layers`` / ``main_layer``). The body is cut after the deepest
    one, so no parameter is left without a gradient. ``dilation`` asks for ``output_stride=16``.

    Transformers take any image size (``timm_image_size``); channels-last maps (Swin) come back
    NCHW. A single-stride model (a plain ViT) returns its last block's map alone, or with ``levels``
    (2..5) or ``return_interm_layers`` the levels of a ``SimpleFeaturePyramid`` built on it; its
    ``trainable_layers`` counts transformer blocks. ``kwargs`` go to ``timm.create_model``.

    ``freeze_norm=False`` keeps the BatchNorms of the stages that train live (batch statistics,
    learned affine), as RT-DETR's R18/R34 recipes train them; those of frozen stages are frozen.
    """

    def __init__(
        self,
        name: str,
        return_interm_layers: bool = False,
        main_layer: int = -1,
        *,
        train_backbone: bool = True,
        dilation: bool = False,
        pretrained: bool = False,
        trainable_layers: int | None = None,
        levels: Sequence[int] | None = None,
        freeze_norm: bool = True,
        kwargs: Mapping[str, Any] | None = None,
    ):
        probe = meta_model(name, kwargs or {}) if timm.is_model(name) else None
        kwargs = {**any_size_options(probe, kwargs or {}), **(kwargs or {})} if probe is not None else {}
        pyramid_levels = list(PYRAMID_LEVELS) if return_interm_layers and levels is None else levels
        single_stride = probe is not None and is_single_stride(probe) and pyramid_levels is not None
        if single_stride:
            out_indices = (-1,)
        else:
            out_indices = tuple(level - LEVELS for level in select_levels(return_interm_layers, main_layer, levels))
        body = self.create_body(name, out_indices, dilation, pretrained, kwargs)
        if freeze_norm:
            freeze_batch_norm_2d(body)
        info = body.feature_info
        blocks = transformer_blocks(body) if probe is not None and is_single_stride(probe) else []
        if blocks:  # a plain ViT: its blocks are its stages
            stage_modules, num_stages = blocks, len(blocks) + 1
        else:
            stage_modules = [found for level in info.info[-LEVELS:] if (found := find_module(body, level["module"]))]
            num_stages = NUM_STAGES
        if trainable_layers is None:
            trainable_layers = num_stages * train_backbone if blocks else detr_trainable_layers(train_backbone)
        if not 0 <= trainable_layers <= num_stages:
            raise ValueError(
                f"backbone.trainable_layers={trainable_layers} must be in 0..{num_stages} for {name!r} "
                f"({num_stages - 1} {'transformer blocks' if blocks else 'stages'} and the stem)"
            )
        channels, strides = info.channels(), info.reduction()
        pyramid = SimpleFeaturePyramid(channels[-1], strides[-1], pyramid_levels) if single_stride else None
        if pyramid is not None:
            channels, strides = pyramid.channels, pyramid.strides
        super().__init__(body, stage_modules, trainable_layers, channels, strides, levels is not None, num_stages)
        if not freeze_norm:
            freeze_untrained_norms(body)
        self.pyramid = pyramid
        self.patch = patch_size(body, name)
        self.nhwc = getattr(body, "output_fmt", "NCHW") == "NHWC"
        self.attention_mask = isinstance(body, FeatureGetterNet) and takes_attention_mask(body.model)

    def create_body(
        self, name: str, out_indices: tuple[int, ...], dilation: bool, pretrained: bool, kwargs: Mapping[str, Any]
    ) -> nn.Module:
        """The timm feature network (a subclass may adapt it: it runs before any freezing)."""
        return create_timm_features(name, out_indices, dilation, pretrained, kwargs)

    def pad_images(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return pad_to_multiple(images, mask, self.patch)

    def feature_maps(self, images: Tensor, mask: Tensor) -> list[Tensor]:
        if self.attention_mask:
            model = self.body.model
            dtype = torch.get_autocast_dtype(images.device.type) if torch.is_autocast_enabled() else images.dtype
            attention = token_attention_mask(mask, self.patch, model.num_prefix_tokens, dtype)
            maps = model.forward_intermediates(
                images, self.body.out_indices, norm=self.body.norm, intermediates_only=True, attn_mask=attention
            )
        else:
            maps = super().feature_maps(images, mask)
        if self.nhwc:
            maps = [feature.permute(0, 3, 1, 2) for feature in maps]
        return maps if self.pyramid is None else self.pyramid(maps[-1])


def create_timm_features(
    name: str, out_indices: tuple[int, ...], dilation: bool, pretrained: bool, kwargs: Mapping[str, Any]
) -> nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(
            f"unknown timm model {name!r}; close names: {', '.join(close) or 'none'} (see timm.list_models())"
        )
    options = {**kwargs, "features_only": True, "out_indices": out_indices}
    if dilation:
        options["output_stride"] = 16
    with explain_download_errors(f"timm pretrained weights for {name}"):
        try:
            body = timm.create_model(name, pretrained=pretrained, **options)
        except (TypeError, RuntimeError, AssertionError, ValueError) as error:
            what = "dilation=true (output_stride=16)" if dilation else "features_only=True"
            raise ValueError(f"timm model {name!r} does not support {what}: {error}") from error
    if dilation and body.feature_info.reduction()[-1] != 16:
        raise ValueError(
            f"timm model {name!r} ignored output_stride=16 (its last level has stride "
            f"{body.feature_info.reduction()[-1]}); it does not support dilation=true"
        )
    return body


def freeze_untrained_norms(body: nn.Module) -> None:
    """Freeze (timm's way) every BatchNorm whose parameters do not train: a frozen stage must not
    move its running statistics either."""
    for name, module in list(body.named_modules()):
        parameters = list(module.parameters(recurse=False))
        if isinstance(module, nn.BatchNorm2d) and parameters and not any(p.requires_grad for p in parameters):
            body.set_submodule(name, freeze_batch_norm_2d(module))


def find_module(body: nn.Module, name: str) -> str | None:
    """Where timm's feature module ``name`` lives in ``body``: as is, or with its first dot flattened."""
    for candidate in (name, name.replace(".", "_", 1), f"model.{name}"):
        try:
            body.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    return None
