"""Boxes as offsets to a reference in logit space: how every Deformable-DETR box head predicts.

A head's raw output is added to the inverse sigmoid of its reference (a point, or a box from the
previous layer or an encoder proposal); the sigmoid of the sum is the box. Small outputs then mean
small moves wherever the reference lies, and the result always stays inside the image.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x kept >= ``eps`` (finite at 0 and 1)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def offset_reference(delta: Tensor, reference: Tensor, eps: float = 1e-5) -> Tensor:
    """Box logits (..., 4): ``delta`` (..., 4) plus the logit of ``reference``, a box (..., 4) or a centre
    (..., 2); a centre moves the box's centre only, the size is ``delta``'s own. ``eps``: see ``inverse_sigmoid``."""
    if reference.shape[-1] == 4:
        return delta + inverse_sigmoid(reference, eps)
    if reference.shape[-1] == 2:
        return torch.cat([delta[..., :2] + inverse_sigmoid(reference, eps), delta[..., 2:]], -1)
    raise ValueError(f"reference must end in 2 (cx, cy) or 4 (cx, cy, w, h), got shape {tuple(reference.shape)}")
