"""A readable account of a Joiner: its levels and which of its parameters train."""
from __future__ import annotations

from torch import Tensor

from .joiner import Joiner
from .nested_tensor import NestedTensor


def parameter_counts(joiner: Joiner) -> dict[str, tuple[int, int]]:
    """(trainable, frozen) parameter counts of the backbone body and the positional encoding."""
    counts = {}
    for part, module in (("backbone body", joiner[0].body), ("positional encoding", joiner[1])):
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        counts[part] = (trainable, sum(p.numel() for p in module.parameters()) - trainable)
    return counts


def describe(joiner: Joiner, images: NestedTensor, features: list[NestedTensor], positions: list[Tensor]) -> str:
    backbone = joiner[0]
    lines = [
        f"{type(backbone).__name__}: trainable_layers={backbone.trainable_layers}, num_channels={joiner.num_channels}",
        f"positional encoding: {joiner[1]!r}".replace("\n", " "),
        f"input: {tuple(images.tensors.shape)}, padding {images.mask.float().mean():.1%} of pixels",
    ]
    for level, (feature, position, stride) in enumerate(zip(features, positions, backbone.feature_strides)):
        lines.append(
            f"level {level}: features {tuple(feature.tensors.shape)} {feature.tensors.dtype} (stride {stride}), "
            f"positions {tuple(position.shape)} {position.dtype}, padding {feature.mask.float().mean():.1%}"
        )
    for part, (trainable, frozen) in parameter_counts(joiner).items():
        lines.append(f"{part}: {trainable:,} trainable, {frozen:,} frozen parameters")
    return "\n".join(lines)
