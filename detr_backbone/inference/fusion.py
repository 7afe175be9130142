"""oneDNN-fused convolutions for inference on a CPU: a ResNet's frozen BatchNorm, ReLU and residual add in the conv.

``fuse_resnet_blocks(detector)`` rewrites, in place, every torchvision ``Bottleneck`` / ``BasicBlock``
and the stem of a torchvision ResNet whose norms are frozen BatchNorms (DETR's backbones). Each
convolution then runs as one ``mkldnn::_convolution_pointwise`` call (the kernel inductor's freezing
emits) with:

- the frozen BatchNorm folded into its weight and bias, as ``bn_folding.FoldedConv2d`` computes them
  (the same float operations, so the same numbers), but once rather than on every call;
- the ReLU after it, and for a block's last convolution the residual add and ReLU, as oneDNN
  post-ops: no separate pass over the feature map;
- its weight reordered ahead of time into the blocked layout oneDNN picks for the input's shape,
  instead of on every call. Packs are kept for the last input shape; a new shape packs again.

The module tree keeps its names, parameters and buffers: ``state_dict()`` is unchanged and loads into
an unfused detector. Packs follow the weights: a parameter replaced or changed in place (``_version``)
is packed again. Fused blocks are for inference only: ``train()`` on them raises.

Measured on two cores (DETR R50, 800 x 1066, ``benchmarks/inference.py``): 1.02x the plain float32
path and 1.07x in bfloat16 on an idle machine, where the convolutions already run near the fp32
matmul peak; 1.15x-1.5x in float32 while other processes share the cores (one parallel region per
convolution instead of four or five, and no per-call weight folding and reordering).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from ..backbones.bn_folding import folded_weight_and_bias, sharing_parameters
from ..backbones.frozen_batch_norm import FoldedFrozenBatchNorm2d, as_folded


def fusion_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused convolutions run here: a CPU with oneDNN, float32 (or bfloat16 where oneDNN has it)."""
    if device.type != "cpu" or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def _version(tensor: Tensor) -> int:
    return 0 if tensor.is_inference() else tensor._version  # inference tensors have no version counter


class FusedConv:
    """One convolution, its frozen BatchNorm and an optional ReLU as a single oneDNN call.

    Not a module: it holds the original ``conv`` and ``norm`` (where they stay registered) and a pack
    of their folded weights for one input shape, remade when the shape or a weight changes.
    """

    def __init__(self, conv: nn.Conv2d, norm: FrozenBatchNorm2d, relu: bool):
        self.conv, self.norm, self.activation = conv, norm, "relu" if relu else "none"
        self.arguments = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.key: tuple | None = None
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def sources(self) -> Iterator[Tensor]:
        yield self.conv.weight
        if self.conv.bias is not None:
            yield self.conv.bias
        yield from (self.norm.weight, self.norm.bias, self.norm.running_mean, self.norm.running_var)

    def folded(self) -> tuple[Tensor, Tensor]:
        """``FoldedConv2d``'s weight and bias, by the same operations."""
        bias = None if self.conv.bias is None else self.conv.bias.detach()
        return folded_weight_and_bias(self.conv.weight.detach(), bias, self.norm)

    def packed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        key = (tuple(x.shape), x.dtype, channels_last, *((t.data_ptr(), _version(t)) for t in self.sources()))
        if key != self.key:
            weight, bias = self.folded()
            if channels_last:
                weight = weight.contiguous(memory_format=torch.channels_last)
            self.weight = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), *self.arguments, list(x.shape))
            self.bias, self.key = bias.contiguous(), key
        return self.weight, self.bias

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``relu?(bn(conv(x)))``, or with ``residual``: ``relu(bn(conv(x)) + residual)``."""
        weight, bias = self.packed(x)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *self.arguments, self.activation, [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, weight, bias, *self.arguments, "add", None, "relu", [], ""
        )


def _is_frozen_norm(module: nn.Module) -> bool:
    # the project's FrozenBatchNorm2d (folded or not) subclasses torchvision's
    return isinstance(module, FrozenBatchNorm2d)


def _is_plain_conv(module: nn.Module) -> bool:
    """A 2-D convolution that ``_convolution_pointwise`` computes as it is (``FoldedConv2d`` included)."""
    return isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _downsample(block: nn.Module) -> FusedConv | None:
    layers = list(block.downsample)
    if len(layers) != 2 or not _is_plain_conv(layers[0]) or not _is_frozen_norm(layers[1]):
        raise ValueError("not a conv + frozen norm downsample")
    return FusedConv(layers[0], layers[1], relu=False)


class FusedResidualBlock(nn.Module):
    """A torchvision ``Bottleneck`` or ``BasicBlock`` run as fused convolutions.

    It registers the block's own children under their names (``conv1``, ``bn1``, ..., ``downsample``),
    so the state dict is the block's; only ``forward`` differs.
    """

    def __init__(self, block: Bottleneck | BasicBlock):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        pairs = [("conv1", "bn1"), ("conv2", "bn2")] + ([("conv3", "bn3")] if isinstance(block, Bottleneck) else [])
        if not all(_is_plain_conv(getattr(block, c)) and _is_frozen_norm(getattr(block, n)) for c, n in pairs):
            raise ValueError("not conv + frozen norm pairs")
        *inner, (last_conv, last_norm) = pairs
        self.inner = [FusedConv(getattr(block, c), getattr(block, n), relu=True) for c, n in inner]
        self.last = FusedConv(getattr(block, last_conv), getattr(block, last_norm), relu=False)
        self.shortcut = None if block.downsample is None else _downsample(block)
        self.eval()

    def train(self, mode: bool = True) -> FusedResidualBlock:
        if mode:
            raise RuntimeError("a fused ResNet block is for inference only; train an unfused detector")
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for conv in self.inner:
            out = conv(out)
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.last(out, residual=identity)


class FusedStemConv(nn.Conv2d):
    """The stem's ``conv1`` with ``bn1`` and the ReLU applied inside it; the same parameters, so the same keys."""

    fused: FusedConv

    @classmethod
    def fusing(cls, conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> FusedStemConv:
        stem = sharing_parameters(cls, conv, norm)
        object.__setattr__(stem, "fused", FusedConv(stem, norm, relu=True))  # held, not registered
        return stem.eval()

    def train(self, mode: bool = True) -> FusedStemConv:
        if mode:
            raise RuntimeError("a fused ResNet stem is for inference only; train an unfused detector")
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fused(x)


def _fuse_stem(parent: nn.Module) -> bool:
    """``conv1 -> bn1 -> relu`` of a ResNet (or of torchvision's IntermediateLayerGetter over one)."""
    children = dict(parent.named_children())
    conv, norm, relu = children.get("conv1"), children.get("bn1"), children.get("relu")
    if not (_is_plain_conv(conv) and _is_frozen_norm(norm) and isinstance(relu, nn.ReLU) and "maxpool" in children):
        return False
    folded = norm if isinstance(norm, FoldedFrozenBatchNorm2d) else as_folded(norm)  # identity, same buffers
    parent.conv1 = FusedStemConv.fusing(conv, folded)
    parent.bn1 = folded
    parent.relu = nn.Identity()
    return True


def fuse_resnet_blocks(module: nn.Module) -> int:
    """Fuse, in place, every torchvision residual block and ResNet stem of ``module`` with frozen norms;
    returns how many were fused (0: nothing to fuse, e.g. GroupNorm or timm backbones)."""
    fused = 0
    for parent in list(module.modules()):
        if isinstance(parent, (FusedResidualBlock, FusedStemConv)):
            continue
        fused += _fuse_stem(parent)
        for name, child in list(parent.named_children()):
            if type(child) in (Bottleneck, BasicBlock):
                try:
                    setattr(parent, name, FusedResidualBlock(child))
                except ValueError:  # another norm (GroupNorm, BatchNorm2d) or layout: left as it is
                    continue
                fused += 1
    return fused
