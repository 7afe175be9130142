"""DETR's frozen BatchNorm, keeping the dtype of its input."""
from __future__ import annotations

from torch import Tensor
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBatchNorm2d


class FrozenBatchNorm2d(_TorchvisionFrozenBatchNorm2d):
    """torchvision's frozen BatchNorm (DETR's buffers, eps 1e-5, ``num_batches_tracked`` dropped on load).

    The affine map is applied in the input's dtype: multiplying autocast's bf16 activations by
    float32 buffers would promote every feature map back to float32, doubling activation memory
    and handing float32 features to the rest of the detector. In float32 this is DETR's arithmetic.
    """

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]
