"""ViTDet's simple feature pyramid: the levels of a multi-scale head, made from one single-stride map.

A plain ViT has one stride (its patch size, 16 or 14). From its last map the pyramid makes four
levels, numbered as a ResNet's by stride: level 2 at half the patch stride (a stride-2
deconvolution), level 3 the map itself, levels 4 and 5 at twice and four times it (stride-2 max
pooling). Each is then projected to ``channels`` by a 1x1 and a 3x3 convolution, each followed by
a LayerNorm over channels, as in ViTDet. Its weights are new: no classifier checkpoint has them.
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.layers import LayerNorm2d
from torch import Tensor, nn

PYRAMID_LEVELS = (2, 3, 4, 5)
NATIVE_LEVEL = 3
PYRAMID_CHANNELS = 256  # ViTDet's


def rescaling(level: int, in_channels: int) -> tuple[list[nn.Module], int]:
    """The modules that bring the native map to ``level``'s stride, and the channels they leave."""
    if level == NATIVE_LEVEL - 1:
        return [nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)], in_channels // 2
    pools = level - NATIVE_LEVEL
    return [nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True) for _ in range(pools)], in_channels


def projection(in_channels: int, channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, channels, kernel_size=1, bias=False),
        LayerNorm2d(channels),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(channels),
    ]


class SimpleFeaturePyramid(nn.Module):
    """The pyramid levels ``levels`` (of 2..5) of a map with ``in_channels`` channels at ``native_stride``."""

    def __init__(self, in_channels: int, native_stride: int, levels: Sequence[int], channels: int = PYRAMID_CHANNELS):
        super().__init__()
        if not levels or any(level not in PYRAMID_LEVELS for level in levels) or list(levels) != sorted(set(levels)):
            raise ValueError(
                f"levels={list(levels)} must be increasing pyramid levels in 2..5 for a single-stride backbone "
                f"(strides {native_stride // 2}, {native_stride}, {native_stride * 2}, {native_stride * 4}), e.g. [2, 3, 4]"
            )
        self.levels = list(levels)
        self.strides = [native_stride * 2**level // 2**NATIVE_LEVEL for level in self.levels]
        self.channels = [channels] * len(self.levels)
        stages = []
        for level in self.levels:
            scaling, scaled_channels = rescaling(level, in_channels)
            stages.append(nn.Sequential(*scaling, *projection(scaled_channels, channels)))
        self.stages = nn.ModuleList(stages)

    def forward(self, native: Tensor) -> list[Tensor]:
        return [stage(native) for stage in self.stages]
