"""RT-DETR's PResNet-vd (ResNet-D) as timm's ``resnet18d`` .. ``resnet101d``, and its weights' key maps.

timm's ResNet-D is PResNet-vd layer for layer (deep 32/32/64 stem, stride on the 3x3 convolution,
2x2 average pool with ceil_mode before the 1x1 shortcut on strided stages), with one difference:
PResNet's BasicBlock (18/34) projects the shortcut of the first block of the first stage (1x1 conv
+ BN, stride 1) although the channels match, where timm keeps the identity. ``ResNetVdBackbone``
grafts that projection on, as the identity (so timm's network, ImageNet weights included, is
unchanged until it trains), which gives the published weights somewhere to go.

The key maps read RT-DETR's checkpoints (``presnet_to_timm``) and Hugging Face's
``RTDetrResNetBackbone`` (``hugging_face_resnet_to_timm``) into this body's keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..weights import BODY_KEY
from .backbone import TimmBackbone, create_timm_features

RESNET_VD_NAMES = ("resnet18d", "resnet34d", "resnet50d", "resnet101d")
STEM_CONVS = ("conv1.0", "conv1.3", "conv1.6")  # timm's deep stem, conv1_1..conv1_3
STEM_NORMS = ("conv1.1", "conv1.4", "bn1")


class ResNetVdBackbone(TimmBackbone):
    """PResNet-vd: timm's ResNet-D (``name`` one of ``RESNET_VD_NAMES``) with PResNet's first shortcut.

    Everything else is ``TimmBackbone``'s: ``levels=[2, 3, 4]`` gives RT-DETR's strides 8/16/32,
    ``trainable_layers=5`` / ``4`` its ``freeze_at: -1`` / ``0``, ``freeze_norm`` its ``freeze_norm``.
    """

    def create_body(
        self, name: str, out_indices: tuple[int, ...], dilation: bool, pretrained: bool, kwargs: Mapping[str, Any]
    ) -> nn.Module:
        if name not in RESNET_VD_NAMES:
            raise ValueError(f"backbone.name={name!r} is not a PResNet-vd; valid names: {', '.join(RESNET_VD_NAMES)}")
        body = create_timm_features(name, out_indices, dilation, pretrained, kwargs)
        first = body.layer1[0]
        if first.downsample is None:
            first.downsample = identity_projection(first.conv1.in_channels)
        return body


def identity_projection(channels: int) -> nn.Sequential:
    """A 1x1 conv + BatchNorm shortcut that starts as the identity, laid out as timm's ``downsample``
    (``Identity`` in place of the pool, so its keys are ``downsample.1`` / ``.2`` like every other)."""
    conv = nn.Conv2d(channels, channels, 1, bias=False)
    nn.init.dirac_(conv.weight)
    return nn.Sequential(nn.Identity(), conv, nn.BatchNorm2d(channels))


# Module paths (without the leaf: weight, bias, running_mean, ...) -> timm's, one table a source.
# A rule is (pattern, function of the match giving the timm module path).
Rule = tuple[str, Callable[[re.Match], str]]


def _stage(match: re.Match) -> str:
    return f"layer{int(match['stage']) + 1}.{match['block']}"


PRESNET_RULES: Sequence[Rule] = (
    (r"conv1\.conv1_(?P<i>[123])\.conv", lambda m: STEM_CONVS[int(m["i"]) - 1]),
    (r"conv1\.conv1_(?P<i>[123])\.norm", lambda m: STEM_NORMS[int(m["i"]) - 1]),
    (
        r"res_layers\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.branch2(?P<i>[abc])\.(?P<kind>conv|norm)",
        lambda m: f"{_stage(m)}.{'conv' if m['kind'] == 'conv' else 'bn'}{'abc'.index(m['i']) + 1}",
    ),
    # pooled shortcut: short.conv.{conv,norm}; plain one: short.{conv,norm}
    (
        r"res_layers\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.short(?:\.conv)?\.(?P<kind>conv|norm)",
        lambda m: f"{_stage(m)}.downsample.{1 if m['kind'] == 'conv' else 2}",
    ),
)

HUGGING_FACE_RESNET_RULES: Sequence[Rule] = (
    (r"embedder\.embedder\.(?P<i>[012])\.convolution", lambda m: STEM_CONVS[int(m["i"])]),
    (r"embedder\.embedder\.(?P<i>[012])\.normalization", lambda m: STEM_NORMS[int(m["i"])]),
    (
        r"encoder\.stages\.(?P<stage>\d+)\.layers\.(?P<block>\d+)\.layer\.(?P<i>[012])\.(?P<kind>convolution|normalization)",
        lambda m: f"{_stage(m)}.{'conv' if m['kind'] == 'convolution' else 'bn'}{int(m['i']) + 1}",
    ),
    # pooled shortcut: shortcut.1.*; plain one: shortcut.*
    (
        r"encoder\.stages\.(?P<stage>\d+)\.layers\.(?P<block>\d+)\.shortcut(?:\.1)?\.(?P<kind>convolution|normalization)",
        lambda m: f"{_stage(m)}.downsample.{1 if m['kind'] == 'convolution' else 2}",
    ),
)


def rename_state(
    state: Mapping[str, Tensor], prefix_in: str, prefix_out: str, rules: Sequence[Rule], source: str
) -> dict[str, Tensor]:
    """The tensors of ``state`` under ``prefix_in``, renamed by ``rules`` and put under ``prefix_out``.

    Keys outside ``prefix_in`` are not returned (the caller maps the rest of a detector); a key
    under it that no rule knows is an error. ``num_batches_tracked`` is dropped: a frozen BatchNorm
    has no such buffer and a live one fills it in when a state dict lacks it.
    """
    compiled = [(re.compile(pattern), rename) for pattern, rename in rules]
    renamed = {}
    for key, tensor in state.items():
        if not key.startswith(prefix_in):
            continue
        module, _, leaf = key[len(prefix_in) :].rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        for pattern, rename in compiled:
            if match := pattern.fullmatch(module):
                renamed[f"{prefix_out}{rename(match)}.{leaf}"] = tensor
                break
        else:
            raise ValueError(f"{key!r} is not a tensor of {source} (under prefix {prefix_in!r})")
    return renamed


def presnet_to_timm(
    state: Mapping[str, Tensor], prefix_in: str = "backbone.", prefix_out: str = BODY_KEY
) -> dict[str, Tensor]:
    """RT-DETR's PResNet-vd tensors (``backbone.conv1.conv1_1.conv.weight``, ...) as ``ResNetVdBackbone``'s
    (``backbone.0.body.conv1.0.weight``, ...); ``prefix_in=""`` for a bare PResNet state dict."""
    return rename_state(state, prefix_in, prefix_out, PRESNET_RULES, "RT-DETR's PResNet")


def hugging_face_resnet_to_timm(
    state: Mapping[str, Tensor], prefix_in: str = "model.backbone.model.", prefix_out: str = BODY_KEY
) -> dict[str, Tensor]:
    """Hugging Face ``RTDetrResNetBackbone`` tensors (``embedder.embedder.0.convolution.weight``, ...; by
    default as ``RTDetrV2ForObjectDetection`` holds them) as ``ResNetVdBackbone``'s."""
    return rename_state(state, prefix_in, prefix_out, HUGGING_FACE_RESNET_RULES, "Hugging Face's RTDetrResNetBackbone")
