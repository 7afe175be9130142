"""DETR's frozen BatchNorm, keeping the dtype of its input."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBatchNorm2d


class FrozenBatchNorm2d(_TorchvisionFrozenBatchNorm2d):
    """torchvision's frozen BatchNorm (DETR's buffers, eps 1e-5, ``num_batches_tracked`` dropped on load).

    The affine map is applied in the input's dtype: multiplying autocast's bf16 activations by
    float32 buffers would promote every feature map back to float32, doubling activation memory
    and handing float32 features to the rest of the detector. In float32 this is DETR's arithmetic.
    """

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` with ``bn(x) = x * scale + shift``, in the buffers' dtype."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        return self.affine(x)

    def affine(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_shift()
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A frozen BatchNorm whose affine map the preceding convolution applies: forward is the identity.

    It keeps its buffers, so the state dict is unchanged; ``bn_folding.FoldedConv2d`` reads them.
    Scripted code, where that convolution does not fold, applies the map here (DETR's plain path).
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.affine(x)
        return x


def as_folded(bn: FrozenBatchNorm2d) -> FoldedFrozenBatchNorm2d:
    """The same buffers (shared, not copied) behind the identity forward."""
    folded = FoldedFrozenBatchNorm2d(bn.weight.shape[0], eps=bn.eps)
    for name, buffer in bn.named_buffers(recurse=False):
        setattr(folded, name, buffer)
    return folded
