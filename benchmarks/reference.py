"""The reference layout, written from torchvision and DETR's formulas, independent of detr_backbone.

A torchvision ResNet with torchvision's FrozenBatchNorm2d (or GroupNorm(32)), cut by torchvision's
IntermediateLayerGetter, NCHW, float32, and DETR's sine encoding computed anew on every call.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d


def detr_sine(mask: Tensor, num_pos_feats: int, temperature: float = 10000.0) -> Tensor:
    """DETR's PositionEmbeddingSine(normalize=True) on a (B, H, W) padding mask."""
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * 2 * math.pi
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class ReferenceJoiner(nn.Module):
    """DETR's backbone + sine encoding for one returned level; ``forward(images, mask)``."""

    def __init__(self, name: str, dilation: bool = False, group_norm: bool = False, hidden_dim: int = 256):
        super().__init__()
        norm = partial(nn.GroupNorm, 32) if group_norm else FrozenBatchNorm2d
        resnet = getattr(torchvision.models, name)(
            replace_stride_with_dilation=[False, False, dilation], norm_layer=norm
        )
        for stage_name, parameter in resnet.named_parameters():  # DETR: stem and layer1 frozen
            if not stage_name.startswith(("layer2", "layer3", "layer4")):
                parameter.requires_grad_(False)
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
        self.hidden_dim = hidden_dim

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feature = self.body(images)["0"]
        feature_mask = F.interpolate(mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
        return feature, feature_mask, detr_sine(feature_mask, self.hidden_dim // 2).to(feature.dtype)
