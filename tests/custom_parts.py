"""A backbone and a positional encoding of a user's own, for the tests of ``_target_`` configs.

Nothing here imports detr_backbone: these are what a user writes in their own package.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyBackbone(nn.Module):
    """Three strided stages (strides 4, 8, 16), declared the way Deformable-DETR's backbones declare them."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.GroupNorm(1, width), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU())
        self.num_channels = [width, 2 * width, 4 * width]
        self.strides = [4, 8, 16]
        self.stage_modules = ["stage1", "stage2", "stage3"]

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.stage1(self.stem(images))
        y = self.stage2(x)
        return [x, y, self.stage3(y)]


def make_tiny_backbone(width: int = 8) -> TinyBackbone:
    """A builder function as a target, as in ``backbone._target_=my_pkg.make_backbone``."""
    return TinyBackbone(width)


class Undeclared(nn.Module):
    """Maps images to feature maps but says nothing about them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, images: Tensor) -> list[Tensor]:
        return [self.conv(images)]


class ReturnsTensor(TinyBackbone):
    """Declares three maps, returns one bare tensor."""

    def forward(self, images: Tensor) -> Tensor:
        return super().forward(images)[-1]


class Unstaged(TinyBackbone):
    """Declares its maps but not its stages."""

    def __init__(self, width: int = 8):
        super().__init__(width)
        del self.stage_modules


class RampEncoding(nn.Module):
    """A fixed encoding of one's own: channel c of every position is (row + column) / period + c."""

    def __init__(self, num_pos_feats: int, period: float = 10.0):
        super().__init__()
        self.channels = 2 * num_pos_feats
        self.period = period

    def forward(self, tensor_list) -> Tensor:
        batch, _, height, width = tensor_list.tensors.shape
        rows = torch.arange(height, dtype=torch.float32, device=tensor_list.tensors.device)[:, None]
        cols = torch.arange(width, dtype=torch.float32, device=tensor_list.tensors.device)[None, :]
        offsets = torch.arange(self.channels, dtype=torch.float32, device=rows.device)[:, None, None]
        return ((rows + cols) / self.period + offsets).expand(batch, -1, -1, -1)


NOT_CALLABLE = 42
