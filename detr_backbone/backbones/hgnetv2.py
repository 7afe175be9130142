"""RT-DETR's HGNetv2 L / X / H as timm's ``hgnetv2_b4`` / ``b5`` / ``b6`` (the same stem, stages and numbers), and
the key map of RT-DETR's HGNetv2 weights onto timm's features body (``stages_N``: timm's ``features_only``
flattens ``stages.N``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ..weights import BODY_KEY
from .key_maps import Rule, rename_state

RTDETR_HGNETV2 = {"L": "hgnetv2_b4", "X": "hgnetv2_b5", "H": "hgnetv2_b6"}

RTDETR_HGNETV2_RULES: Sequence[Rule] = (
    # RT-DETR wraps the stem's 2x2 convolutions with their "same" padding: stem2a.conv.1 is timm's stem2a.conv
    (r"stem\.(?P<layer>stem2[ab])\.conv\.1", lambda m: f"stem.{m['layer']}.conv"),
    (r"stem\.stem(?:1|2a|2b|3|4)\.(?:conv|bn)", lambda m: m[0]),
    (
        r"stages\.(?P<stage>\d+)\.(?P<rest>downsample\.(?:conv|bn)|blocks\.\d+\.layers\.\d+\.(?:conv[12]\.)?(?:conv|bn))",
        lambda m: f"stages_{m['stage']}.{m['rest']}",
    ),
    (
        r"stages\.(?P<stage>\d+)\.(?P<block>blocks\.\d+)\.aggregation_(?P<kind>squeeze|excitation)_conv\.(?P<part>conv|bn)",
        lambda m: f"stages_{m['stage']}.{m['block']}.aggregation.{0 if m['kind'] == 'squeeze' else 1}.{m['part']}",
    ),
)


def rtdetr_hgnetv2_to_timm(
    state: Mapping[str, Tensor], prefix_in: str = "backbone.", prefix_out: str = BODY_KEY
) -> dict[str, Tensor]:
    """RT-DETR's HGNetv2 tensors (``backbone.stem.stem2a.conv.1.weight``, ...) as a timm ``hgnetv2_b4/5/6`` features
    body's (``backbone.0.body.stem.stem2a.conv.weight``, ...); ``prefix_in=""`` for a bare HGNetv2 state dict."""
    return rename_state(state, prefix_in, prefix_out, RTDETR_HGNETV2_RULES, "RT-DETR's HGNetv2")
