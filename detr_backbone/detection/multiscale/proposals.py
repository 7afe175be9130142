"""Two-stage Deformable DETR's region proposals: one box per encoder position, and their sine embedding.

Every position of every level proposes a box centred on its pixel, 0.05 * 2**level wide and high
(relative to the valid image); the encoder's heads then score and move them, and the best become
the decoder's queries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .attention import SpatialShapes
from .levels import valid_sizes

BASE_SIZE = 0.05  # a proposal's width and height on the first level, doubling on each next one
KEEP_RANGE = (0.01, 0.99)  # proposals with a coordinate outside are dropped (too close to the border)


def encoder_proposals(padding_mask: Tensor, spatial_shapes: SpatialShapes) -> tuple[Tensor, Tensor]:
    """(proposals, keep) for the flattened levels: proposals (B, S, 4) as logits of (cx, cy, w, h),
    ``inf`` where not kept; ``keep`` (B, S, 1) is False on padding and on proposals outside ``KEEP_RANGE``."""
    batch = padding_mask.shape[0]
    proposals = []
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        mask = padding_mask[:, start : start + height * width].view(batch, height, width)
        start += height * width
        y, x = torch.meshgrid(
            torch.arange(height, dtype=torch.float32, device=mask.device),
            torch.arange(width, dtype=torch.float32, device=mask.device),
            indexing="ij",
        )
        centres = (torch.stack([x, y], -1)[None] + 0.5) / valid_sizes(mask).float()[:, None, None, :]
        sizes = torch.full_like(centres, BASE_SIZE * 2.0**level)
        proposals.append(torch.cat([centres, sizes], -1).view(batch, -1, 4))
    proposals = torch.cat(proposals, 1)
    low, high = KEEP_RANGE
    keep = ((proposals > low) & (proposals < high)).all(-1, keepdim=True) & ~padding_mask[..., None]
    # where not kept the logit may be NaN (padding lies beyond the valid size): replaced, and no gradient flows
    logits = torch.log(proposals / (1 - proposals))
    return logits.masked_fill(~keep, float("inf")), keep


def coordinate_sine_embedding(coordinates: Tensor, num_pos_feats: int = 128, temperature: float = 10000) -> Tensor:
    """(..., K * num_pos_feats): DETR's sine encoding of each of K coordinates in [0, 1] (..., K), sin on even
    and cos on odd features, one block per coordinate in their order."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=coordinates.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    angles = coordinates[..., None] * (2 * math.pi) / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-3)


def proposal_position_embedding(box_logits: Tensor, num_pos_feats: int = 128, temperature: float = 10000) -> Tensor:
    """(B, K, 4 * num_pos_feats): the sine encoding of sigmoid(``box_logits``) (B, K, 4) in order cx, cy, w, h."""
    return coordinate_sine_embedding(box_logits.sigmoid(), num_pos_feats, temperature)
