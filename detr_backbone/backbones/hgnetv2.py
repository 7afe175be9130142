"""PP-HGNetV2 as timm's ``hgnetv2_b0`` .. ``b6``: RT-DETR's HGNetv2 L / X / H are ``b4`` / ``b5`` / ``b6``, D-FINE's
B0 .. B5 are ``b0`` .. ``b5`` (the same stem, stages, numbers and learnable affine blocks), and the key map of
either's weights onto timm's features body (``stages_N``: timm's ``features_only`` flattens ``stages.N``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ..weights import BODY_KEY
from .key_maps import Rule, rename_state

RTDETR_HGNETV2 = {"L": "hgnetv2_b4", "X": "hgnetv2_b5", "H": "hgnetv2_b6"}

# A convolution unit: conv, BatchNorm and, after an activation where use_lab is on, the learnable affine (lab)
UNIT = r"(?:conv|bn|lab)"
HGNETV2_RULES: Sequence[Rule] = (
    # RT-DETR wraps the stem's 2x2 convolutions with their "same" padding: stem2a.conv.1 is timm's stem2a.conv
    (r"stem\.(?P<layer>stem2[ab])\.conv\.1", lambda m: f"stem.{m['layer']}.conv"),
    (rf"stem\.stem(?:1|2a|2b|3|4)\.{UNIT}", lambda m: m[0]),
    (
        rf"stages\.(?P<stage>\d+)\.(?P<rest>downsample\.{UNIT}|blocks\.\d+\.(?:layers\.\d+\.(?:conv[12]\.)?|aggregation\.[01]\.){UNIT})",
        lambda m: f"stages_{m['stage']}.{m['rest']}",
    ),
    # RT-DETR names the aggregation's two convolutions, D-FINE (and timm) number them
    (
        rf"stages\.(?P<stage>\d+)\.(?P<block>blocks\.\d+)\.aggregation_(?P<kind>squeeze|excitation)_conv\.(?P<part>{UNIT})",
        lambda m: f"stages_{m['stage']}.{m['block']}.aggregation.{0 if m['kind'] == 'squeeze' else 1}.{m['part']}",
    ),
)


def hgnetv2_to_timm(
    state: Mapping[str, Tensor], prefix_in: str = "backbone.", prefix_out: str = BODY_KEY
) -> dict[str, Tensor]:
    """RT-DETR's or D-FINE's HGNetv2 tensors (``backbone.stem.stem2a.conv.1.weight``,
    ``backbone.stem.stem1.lab.scale``, ...) as a timm ``hgnetv2_b0`` .. ``b6`` features body's
    (``backbone.0.body.stem.stem2a.conv.weight``, ...); ``prefix_in=""`` for a bare HGNetv2 state dict."""
    return rename_state(state, prefix_in, prefix_out, HGNETV2_RULES, "RT-DETR's or D-FINE's HGNetv2")
