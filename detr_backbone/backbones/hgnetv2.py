"""PP-HGNetV2 as timm's ``hgnetv2_b0`` .. ``b6``: RT-DETR's HGNetv2 L / X / H are ``b4`` / ``b5`` / ``b6``, D-FINE's
B0 .. B5 are ``b0`` .. ``b5`` (the same stem, stages, numbers and learnable affine blocks), and the key map of
either's weights onto timm's features body (``stages_N``: timm's ``features_only`` flattens ``stages.N``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor

from ..weights import BODY_KEY
from .key_maps import Rule, rename_state

RTDETR_HGNETV2 = {"L": "hgnetv2_b4", "X": "hgnetv2_b5", "H": "hgnetv2_b6"}
# (the stem's first width, blocks per stage, the last stage's width) -> timm's name: blocks alone do not tell
# b0 from b1, nor b2 / b3 / b4 apart (timm's hgnet.py model_cfgs)
HGNETV2_SIZES = {
    (16, (1, 1, 2, 1), 1024): "hgnetv2_b0",
    (24, (1, 1, 2, 1), 1024): "hgnetv2_b1",
    (24, (1, 1, 3, 1), 1536): "hgnetv2_b2",
    (24, (1, 1, 3, 1), 2048): "hgnetv2_b3",
    (32, (1, 1, 3, 1), 2048): "hgnetv2_b4",
    (32, (1, 2, 5, 2), 2048): "hgnetv2_b5",
    (48, (2, 3, 6, 3), 2048): "hgnetv2_b6",
}
LAB_SIZES = ("hgnetv2_b0", "hgnetv2_b1", "hgnetv2_b2", "hgnetv2_b3")  # with learnable affine blocks (use_lab)

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


def hgnetv2_size(stem_width: int, blocks: Sequence[int], last_width: int) -> str | None:
    """timm's ``hgnetv2_bN`` of these sizes; None for none of them."""
    return HGNETV2_SIZES.get((stem_width, tuple(blocks), last_width))


def timm_hgnetv2_size(state: Mapping[str, Tensor], prefix: str = BODY_KEY) -> str | None:
    """timm's name of the size of an HGNetv2 features body under timm's names (``hgnetv2_to_timm``'s output);
    None where it matches none."""
    blocks: dict[int, set[str]] = {}
    for key in state:
        if match := re.match(re.escape(prefix) + r"stages_(\d+)\.blocks\.(\d+)\.", key):
            blocks.setdefault(int(match[1]), set()).add(match[2])
    stem = state.get(f"{prefix}stem.stem1.conv.weight")
    if stem is None or not blocks:
        return None
    last = max(blocks)
    excitation = state.get(f"{prefix}stages_{last}.blocks.0.aggregation.1.conv.weight")
    counts = [len(blocks.get(stage, ())) for stage in range(last + 1)]
    return None if excitation is None else hgnetv2_size(stem.shape[0], counts, excitation.shape[0])
