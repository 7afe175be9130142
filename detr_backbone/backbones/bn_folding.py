"""Frozen BatchNorm folded into the convolution before it, at forward time.

``conv(x, W) * scale + shift == conv(x, W * scale) + shift``: the folded convolution computes the
right-hand side with the norm's current buffers on every call, so the BatchNorm's elementwise pass
over the feature map disappears while gradients still reach ``W`` (a trained stage keeps training).
Nothing is renamed or copied: the convolution keeps its parameters, the norm keeps its buffers
under its own name, so the state dict is DETR's and checkpoints load before or after folding.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

from .frozen_batch_norm import FoldedFrozenBatchNorm2d, FrozenBatchNorm2d, as_folded

ConvType = TypeVar("ConvType", bound=nn.Conv2d)
# ours, and torchvision's, which timm's freeze_batch_norm_2d puts in its ResNets (the same buffers)
FOLDABLE = (FrozenBatchNorm2d, TorchvisionFrozenBatchNorm2d)


def sharing_parameters(cls: type[ConvType], conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> ConvType:
    """A ``cls`` with ``conv``'s settings and its very parameters (no copy, the same state dict keys),
    holding ``norm`` as a plain attribute: the norm stays registered where it was."""
    made = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
        device="meta",
    )
    made.weight, made.bias = conv.weight, conv.bias
    made.train(conv.training)
    object.__setattr__(made, "norm", norm)
    return made


def folded_weight_and_bias(weight: Tensor, bias: Tensor | None, norm: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """The convolution's weight and bias with ``norm`` applied: ``bn(conv(x, W, b)) == conv(x, W', b')``."""
    scale, shift = FrozenBatchNorm2d.scale_shift(norm)
    folded_bias = shift if bias is None else bias * scale + shift
    return weight * scale.to(weight.dtype)[:, None, None, None], folded_bias.to(weight.dtype)


class FoldedConv2d(nn.Conv2d):
    """A Conv2d that applies the frozen BatchNorm following it (held, not registered: no new keys).

    TorchScript cannot hold an unregistered module, so scripted code takes the plain path: this
    convolution alone, then the norm, which applies itself there (``FoldedFrozenBatchNorm2d``).
    """

    @classmethod
    def folding(cls, conv: nn.Conv2d, norm: FoldedFrozenBatchNorm2d) -> FoldedConv2d:
        return sharing_parameters(cls, conv, norm)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(x, *folded_weight_and_bias(self.weight, self.bias, self.norm))


def _norm_after(conv_name: str) -> str | None:
    """Where torchvision's ResNets put the norm that reads a convolution: conv2 -> bn2, downsample.0 -> .1."""
    if conv_name.startswith("conv"):
        return "bn" + conv_name.removeprefix("conv")
    if conv_name.isdigit():
        return str(int(conv_name) + 1)
    return None


def fold_frozen_batch_norm(module: nn.Module) -> int:
    """Fold every FrozenBatchNorm2d of ``module`` into the convolution that feeds it; returns how many.

    Pairs are found by torchvision's and timm's ResNet naming (``convK``/``bnK`` siblings, and consecutive
    entries of a Sequential); other norms (GroupNorm, timm's frozen norms with an activation) are left as they are.
    """
    folded = 0
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        for name, conv in children.items():
            norm_name = _norm_after(name)
            norm = children.get(norm_name)
            if type(conv) is nn.Conv2d and type(norm) in FOLDABLE and norm.weight.numel() == conv.out_channels:
                identity = as_folded(norm)
                setattr(parent, norm_name, identity)
                setattr(parent, name, FoldedConv2d.folding(conv, identity))
                folded += 1
    return folded
