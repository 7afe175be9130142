"""D-FINE's boxes as distributions (fine-grained distribution refinement, FDR).

A box is its reference box moved edge by edge: each of the four edges (left, top, right, bottom) is a
distribution over ``reg_max + 1`` bins, and the edge's distance from the reference is the expectation of the
bins' values W(n). W is D-FINE's non-uniform weighting function: 0 in the middle bin, growing geometrically
towards both ends, ``±up * reg_scale`` at the bins next to the ends and ``±2 * up * reg_scale`` at the ends, so
that small corrections are fine and large ones possible. Distances are in units of the reference's size divided
by ``reg_scale``, measured from the reference's edges (an edge at distance 0 stays where the reference has it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert


def weighting_function(reg_max: int, up: Tensor, reg_scale: Tensor) -> Tensor:
    """W(n) for n = 0 .. reg_max, (reg_max + 1,): ``-2a, 1 - s^(reg_max/2 - 1), .., 1 - s, 0, s - 1, ..,
    s^(reg_max/2 - 1) - 1, 2a`` with ``a = |up * reg_scale|`` and ``s = (a + 1)^(2 / (reg_max - 2))``, so the
    bins next to the ends are at ``±a``."""
    if reg_max < 4 or reg_max % 2:
        raise ValueError(f"reg_max={reg_max} must be an even number >= 4 (bins symmetric around a middle 0)")
    bound = (up.abs() * reg_scale.abs()).reshape(1)
    step = (bound + 1) ** (2 / (reg_max - 2))
    right = step ** torch.arange(1, reg_max // 2, dtype=bound.dtype, device=bound.device) - 1
    return torch.cat([-2 * bound, -right.flip(0), torch.zeros_like(bound), right, 2 * bound])


def expected_distances(corner_logits: Tensor, project: Tensor) -> Tensor:
    """(..., 4) edge distances from (..., 4 * (reg_max + 1)) bin logits: each edge's softmax over its bins
    dotted with W(n) (``project``)."""
    bins = project.shape[0]
    probabilities = F.softmax(corner_logits.reshape(*corner_logits.shape[:-1], 4, bins), dim=-1)
    return probabilities @ project.to(probabilities.dtype)


def distances_to_boxes(reference: Tensor, distances: Tensor, reg_scale: Tensor) -> Tensor:
    """Boxes (..., 4) as (cx, cy, w, h) from reference boxes (cx, cy, w, h) and edge distances (left, top, right,
    bottom): an edge sits ``(0.5 * reg_scale + d) * size / reg_scale`` from the reference's centre."""
    scale = reg_scale.abs()
    centre, size = reference[..., :2], reference[..., 2:]
    near = centre - (0.5 * scale + distances[..., :2]) * (size / scale)
    far = centre + (0.5 * scale + distances[..., 2:]) * (size / scale)
    return box_convert(torch.cat([near, far], -1), "xyxy", "cxcywh")


def boxes_to_distances(reference: Tensor, boxes: Tensor, reg_scale: Tensor) -> Tensor:
    """Edge distances (left, top, right, bottom) (..., 4) that move ``reference`` boxes onto cxcywh ``boxes``: the
    inverse of ``distances_to_boxes`` (D-FINE's ``bbox2distance`` before the bins)."""
    scale = reg_scale.abs()
    corners = box_convert(boxes, "cxcywh", "xyxy")
    centre, size = reference[..., :2], reference[..., 2:]
    near = (centre - corners[..., :2]) / (size / scale) - 0.5 * scale
    far = (corners[..., 2:] - centre) / (size / scale) - 0.5 * scale
    return torch.cat([near, far], -1)


def bin_positions(distances: Tensor, project: Tensor) -> Tensor:
    """Each distance as a fractional bin index in [0, reg_max]: k + t where W(k) <= d < W(k + 1) and t is d's linear
    position between the two (D-FINE's ``translate_gt``: the target of the fine-grained localization loss puts
    1 - t on bin k and t on bin k + 1). Distances beyond the ends land on the end bins, 0 and reg_max."""
    reg_max = project.shape[0] - 1
    project = project.to(distances.dtype)
    left = torch.searchsorted(project, distances.contiguous(), right=True) - 1  # -1 below W(0), reg_max from W(reg_max)
    bin_below = left.clamp(0, reg_max - 1)
    low, high = project[bin_below], project[bin_below + 1]
    positions = bin_below + (distances - low) / (high - low)
    positions = torch.where(left < 0, torch.zeros_like(positions), positions)
    return torch.where(left >= reg_max, torch.full_like(positions, reg_max), positions)
