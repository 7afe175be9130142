"""Where each image's content lies on padded multi-scale maps: valid sizes, ratios and reference points.

Deformable DETR's reference points are relative to the valid (unpadded) part of an image, so that
a point means the same place in every image of a batch; the attention samples relative to the
padded map, so points are scaled by each level's valid ratio before sampling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import SpatialShapes


def valid_sizes(mask: Tensor) -> Tensor:
    """(B, 2) valid width and height of padding masks (B, H, W): the unpadded columns of the first row
    and rows of the first column (images are padded at the bottom and right)."""
    return torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1)


def valid_ratios(mask: Tensor) -> Tensor:
    """(B, 2) fraction of the map's width and height that is not padding, in float32."""
    height, width = mask.shape[-2:]
    return valid_sizes(mask).float() / torch.tensor([width, height], dtype=torch.float32, device=mask.device)


def encoder_reference_points(spatial_shapes: SpatialShapes, ratios: Tensor) -> Tensor:
    """(B, S, L, 2) reference points of the encoder's queries, for ``ratios`` (B, L, 2) from ``valid_ratios``.

    Every position's pixel centre, as (x, y) relative to its own level's valid region, placed on
    each of the L levels' padded maps (the same place in the image at every level).
    """
    points = []
    for level, (height, width) in enumerate(spatial_shapes):
        y, x = torch.meshgrid(
            torch.arange(height, dtype=torch.float32, device=ratios.device) + 0.5,
            torch.arange(width, dtype=torch.float32, device=ratios.device) + 0.5,
            indexing="ij",
        )
        x = x.reshape(1, -1) / (ratios[:, None, level, 0] * width)
        y = y.reshape(1, -1) / (ratios[:, None, level, 1] * height)
        points.append(torch.stack((x, y), -1))
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]
