"""The levels a multi-scale head reads: the Joiner's maps projected to the transformer's width, extra levels
made by strided convolutions, and where each image's content lies on them (valid sizes, ratios, reference points).

Deformable DETR's reference points are relative to the valid (unpadded) part of an image, so that
a point means the same place in every image of a batch; the attention samples relative to the
padded map, so points are scaled by each level's valid ratio before sampling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...backbones.backbone import downsample_mask
from ...joiner import Joiner
from ...nested_tensor import NestedTensor
from .attention import SpatialShapes

GROUP_NORM_GROUPS = 32
LINEAR_PROJECTION_NAMES = ("reference_points", "sampling_offsets")


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


def level_projection(in_channels: int, hidden_dim: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, hidden_dim, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.xavier_uniform_(conv.weight, gain=1)
    nn.init.constant_(conv.bias, 0)
    return nn.Sequential(conv, nn.GroupNorm(GROUP_NORM_GROUPS, hidden_dim))


def level_projections(backbone_channels: list[int], hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
    """One 1x1 projection per Joiner level, then 3x3 stride-2 projections up to ``num_feature_levels`` (the
    first reads the deepest backbone map, the next the previous extra level)."""
    projections = [level_projection(channels, hidden_dim, 1) for channels in backbone_channels]
    in_channels = backbone_channels[-1]
    for _ in range(num_feature_levels - len(backbone_channels)):
        projections.append(level_projection(in_channels, hidden_dim, 3, stride=2))
        in_channels = hidden_dim
    return nn.ModuleList(projections)


def project_levels(
    input_proj: nn.ModuleList,
    joiner: Joiner,
    samples: NestedTensor,
    features: list[NestedTensor],
    positions: list[Tensor],
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Every level's projected map, padding mask and positional map, extra levels computed here."""
    srcs = [projection(feature.tensors) for projection, feature in zip(input_proj, features)]
    masks = [feature.mask for feature in features]
    positions = list(positions)
    for projection in input_proj[len(features) :]:
        src = projection(features[-1].tensors if len(srcs) == len(features) else srcs[-1])
        mask = downsample_mask(samples.mask, src.shape[-2:])
        positions.append(joiner[1](NestedTensor(src, mask)).to(src.dtype))
        srcs.append(src)
        masks.append(mask)
    return srcs, masks, positions


def linear_projection_parameters(detector: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the linear layers that place sampling points and references, which
    Deformable-DETR and DINO train at ``lr * lr_linear_proj_mult`` (0.1): a large step moves where every query looks."""
    return [
        (name, parameter)
        for name, parameter in detector.named_parameters()
        if any(keyword in name for keyword in LINEAR_PROJECTION_NAMES) and not name.startswith("backbone.")
    ]


def check_levels(d_model: int, transformer_levels: int, backbone_levels: int, num_feature_levels: int) -> None:
    """The level projections' GroupNorm and level counts fit the transformer and the Joiner."""
    if d_model % GROUP_NORM_GROUPS:
        raise ValueError(
            f"the level projections use GroupNorm(32, hidden_dim): hidden_dim must be a multiple of 32, got {d_model}"
        )
    if num_feature_levels != transformer_levels:
        raise ValueError(
            f"num_feature_levels={num_feature_levels} but the transformer was built for {transformer_levels}"
        )
    if num_feature_levels < backbone_levels:
        raise ValueError(
            f"num_feature_levels={num_feature_levels} is fewer than the Joiner's {backbone_levels} levels; "
            f"use num_feature_levels >= {backbone_levels} or a Joiner with fewer levels"
        )
