"""Positional encodings: DETR's sine formula checked pixel by pixel, the learned table, dtypes, DETR calls."""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch

from detr_backbone import (
    NestedTensor,
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    build_backbone,
    build_position_encoding,
    nested_tensor_from_tensor_list,
)


def padded_masks(height: int, width: int, valid: list[tuple[int, int]]) -> torch.Tensor:
    """(B, H, W) masks, True on padding: image b is valid on its top-left valid[b] = (h, w) corner."""
    mask = torch.ones(len(valid), height, width, dtype=torch.bool)
    for b, (h, w) in enumerate(valid):
        mask[b, :h, :w] = False
    return mask


def nested(mask: torch.Tensor, channels: int = 3) -> NestedTensor:
    return NestedTensor(torch.randn(mask.shape[0], channels, *mask.shape[1:]), mask)


def reference_sine(mask, num_pos_feats, temperature=10000.0, normalize=False, scale=None, offset=0.0, eps=1e-6):
    """DETR's sine encoding computed pixel by pixel in float64 from the written formula."""
    scale = 2 * math.pi if scale is None else scale
    valid = (~mask).tolist()
    batch, height, width = mask.shape
    out = torch.zeros(batch, 2 * num_pos_feats, height, width, dtype=torch.float64)
    for b in range(batch):
        for r in range(height):
            for c in range(width):
                # Count of valid pixels up to and including this one, along the column (y) and the row (x).
                y = sum(valid[b][k][c] for k in range(r + 1))
                x = sum(valid[b][r][k] for k in range(c + 1))
                if normalize:
                    y_last = sum(valid[b][k][c] for k in range(height))
                    x_last = sum(valid[b][r][k] for k in range(width))
                    y = (y + offset) / (y_last + eps) * scale
                    x = (x + offset) / (x_last + eps) * scale
                for i in range(num_pos_feats):
                    freq = temperature ** (2 * (i // 2) / num_pos_feats)
                    trig = math.sin if i % 2 == 0 else math.cos
                    out[b, i, r, c] = trig(y / freq)
                    out[b, num_pos_feats + i, r, c] = trig(x / freq)
    return out


# Image 0 unpadded, image 1 padded at the bottom, image 2 on the right, image 3 on both sides.
MASK = padded_masks(7, 9, [(7, 9), (4, 9), (7, 5), (3, 2)])


@pytest.mark.parametrize(
    "num_pos_feats, options",
    [
        (8, {}),
        (8, {"normalize": True}),
        (6, {"normalize": True, "scale": 1.5}),
        (8, {"temperature": 20.0}),
        (10, {"temperature": 100.0, "normalize": True}),
    ],
)
def test_sine_matches_formula(num_pos_feats, options):
    """Every pixel and channel, padded ones included, equals the formula (padding is not counted)."""
    pos = PositionEmbeddingSine(num_pos_feats, **options)(nested(MASK))
    assert pos.shape == (4, 2 * num_pos_feats, 7, 9)
    expected = reference_sine(MASK, num_pos_feats, **options)
    torch.testing.assert_close(pos.double(), expected, atol=1e-5, rtol=0)


def test_sine_deformable_offset_matches_formula_on_valid_pixels():
    """offset=-0.5 shifts the position only, not the denominator (Deformable-DETR).

    Rows/columns that are all padding divide by eps alone, giving angles of ~1e6 whose sine is
    float32 noise, so only valid pixels are compared (those are the ones attention reads).
    """
    pos = PositionEmbeddingSine(8, normalize=True, offset=-0.5)(nested(MASK))
    expected = reference_sine(MASK, 8, normalize=True, offset=-0.5)
    valid = (~MASK)[:, None].expand_as(pos)
    torch.testing.assert_close(pos.double()[valid], expected[valid], atol=1e-5, rtol=0)
    # The offset really changes the result: without it the first pixel's y position is 1/h * 2pi, not 0.5/h.
    plain = PositionEmbeddingSine(8, normalize=True)(nested(MASK))
    assert not torch.allclose(pos[valid], plain[valid], atol=1e-3)


def test_sine_ignores_image_content_and_counts_only_valid_pixels():
    """Same mask, different pixels: same encoding; an image's encoding depends on its own mask only."""
    encoding = PositionEmbeddingSine(8, normalize=True)
    a, b = encoding(nested(MASK)), encoding(nested(MASK))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Image 1 (valid 4x9) padded into 7x9 encodes its valid region like an unpadded 4x9 image.
    alone = encoding(nested(padded_masks(4, 9, [(4, 9)])))
    torch.testing.assert_close(a[1, :, :4, :], alone[0], atol=1e-6, rtol=0)


def test_sine_output_is_float32_under_autocast():
    """The encoding computes in float32 even inside a bf16 autocast region and for bf16 inputs."""
    inputs = NestedTensor(torch.randn(4, 3, 7, 9, dtype=torch.bfloat16), MASK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pos = PositionEmbeddingSine(8, normalize=True)(inputs)
    assert pos.dtype == torch.float32
    torch.testing.assert_close(pos.double(), reference_sine(MASK, 8, normalize=True), atol=1e-5, rtol=0)


def test_sine_constructor_errors():
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(8, scale=1.0)  # scale without normalize would be silently unused
    with pytest.raises(ValueError, match="7"):
        PositionEmbeddingSine(7)  # channels come in sin/cos pairs
    with pytest.raises(ValueError, match="temperature"):
        PositionEmbeddingSine(8, temperature=0)


def test_learned_is_table_lookup_and_ignores_mask():
    """Channels [col_embed[x], row_embed[y]] at every pixel; the padding mask plays no part."""
    torch.manual_seed(0)
    encoding = PositionEmbeddingLearned(4)
    pos = encoding(nested(MASK))
    assert pos.shape == (4, 8, 7, 9)
    col, row = encoding.col_embed.weight, encoding.row_embed.weight
    for b in range(4):
        for y in range(7):
            for x in range(9):
                torch.testing.assert_close(pos[b, :4, y, x], col[x], atol=0, rtol=0)
                torch.testing.assert_close(pos[b, 4:, y, x], row[y], atol=0, rtol=0)
    unpadded = encoding(nested(torch.zeros_like(MASK)))
    torch.testing.assert_close(pos, unpadded, atol=0, rtol=0)


def test_learned_init_is_uniform_0_1():
    """DETR re-initialises the tables uniform in [0, 1) (nn.Embedding's default is N(0, 1))."""
    torch.manual_seed(0)
    encoding = PositionEmbeddingLearned(64)
    for table in (encoding.row_embed.weight, encoding.col_embed.weight):
        assert table.shape == (50, 64)
        assert 0.0 <= table.min() < 0.05 and 0.95 < table.max() < 1.0
        assert abs(table.mean().item() - 0.5) < 0.05


@pytest.mark.parametrize("height, width", [(51, 10), (10, 51)])
def test_learned_too_large_map_names_size_and_option(height, width):
    """DETR fails with an index error past 50 rows/columns; we say how large and which option to raise."""
    encoding = PositionEmbeddingLearned(4)
    with pytest.raises(ValueError, match="51") as error:
        encoding(NestedTensor(torch.zeros(1, 3, height, width), torch.zeros(1, height, width, dtype=torch.bool)))
    assert "position.num_embeddings" in str(error.value)


def test_learned_larger_table_covers_larger_maps():
    torch.manual_seed(0)
    encoding = PositionEmbeddingLearned(4, num_embeddings=64)
    assert encoding.row_embed.weight.shape == (64, 4)
    mask = torch.zeros(1, 64, 51, dtype=torch.bool)
    pos = encoding(nested(mask))
    assert pos.shape == (1, 8, 64, 51)
    torch.testing.assert_close(pos[0, :4, 63, 50], encoding.col_embed.weight[50], atol=0, rtol=0)
    torch.testing.assert_close(pos[0, 4:, 63, 50], encoding.row_embed.weight[63], atol=0, rtol=0)
    PositionEmbeddingLearned(4, num_embeddings=50)(nested(torch.zeros(1, 50, 50, dtype=torch.bool)))  # 50 fits
    with pytest.raises(ValueError, match="65"):
        encoding(nested(torch.zeros(1, 65, 3, dtype=torch.bool)))


def test_state_dict_keys_match_detr_checkpoints():
    """DETR checkpoints hold exactly these learned-table keys; the sine encoding holds nothing."""
    state = PositionEmbeddingLearned(128).state_dict()
    assert set(state) == {"row_embed.weight", "col_embed.weight"}
    assert all(value.shape == (50, 128) for value in state.values())
    assert len(PositionEmbeddingSine(128, normalize=True).state_dict()) == 0


# --- Joiner dtypes -------------------------------------------------------------------------------


def joiner(position: str):
    torch.manual_seed(0)
    return build_backbone(
        {
            "backbone": {"kind": "torchvision", "name": "resnet18"},
            "position": {"kind": position},
            "hidden_dim": 64,
            "lr_backbone": 1e-5,
        }
    ).eval()


def padded_batch() -> NestedTensor:
    torch.manual_seed(1)
    return nested_tensor_from_tensor_list([torch.randn(3, 96, 128), torch.randn(3, 64, 96)])


@pytest.mark.parametrize("position", ["sine", "learned"])
def test_joiner_bf16_model_casts_positions_to_feature_dtype(position):
    """A bf16 backbone gives bf16 features; positions (computed in fp32) are cast to them, within bf16 rounding.

    Only the backbone is cast, so the learned table stays fp32 and the Joiner's cast is what is tested.
    """
    model = joiner(position)
    batch = padded_batch()
    with torch.no_grad():
        _, reference = model(batch)
        bf16_model = copy.deepcopy(model)
        bf16_model[0].to(torch.bfloat16)
        features, positions = bf16_model(batch.to(torch.bfloat16))
    assert len(features) == len(positions) == 1
    feature, pos = features[0], positions[0]
    assert feature.tensors.dtype == torch.bfloat16 and pos.dtype == torch.bfloat16
    assert pos.shape == (2, 64, 3, 4) == reference[0].shape
    # bf16 keeps ~3 significant digits; every value here lies in [-1, 1].
    torch.testing.assert_close(pos.float(), reference[0], atol=1e-2, rtol=0)


@pytest.mark.parametrize("position", ["sine", "learned"])
def test_joiner_autocast_positions_follow_features(position):
    """Under bf16 autocast each positional map has its feature map's dtype and the fp32 values (to 1e-2)."""
    model = joiner(position)
    batch = padded_batch()
    with torch.no_grad():
        _, reference = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features, positions = model(batch)
    assert positions[0].dtype == features[0].tensors.dtype
    assert features[0].mask.dtype == torch.bool
    # The second image (64x96) is padded: its last feature row/column are padding.
    assert features[0].mask[1].sum() > 0 and not features[0].mask[0].any()
    torch.testing.assert_close(positions[0].float(), reference[0], atol=1e-2, rtol=0)


def test_joiner_autocast_features_are_bf16():
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features, positions = joiner("sine")(padded_batch())
    assert features[0].tensors.dtype == torch.bfloat16
    assert positions[0].dtype == torch.bfloat16


# --- DETR call compatibility ---------------------------------------------------------------------


def test_detr_positional_constructor_arguments():
    """DETR calls PositionEmbeddingSine(N_steps, temperature, normalize, scale) and PositionEmbeddingLearned(N_steps)."""
    sine = PositionEmbeddingSine(4, 20.0, True, 3.0)
    assert (sine.num_pos_feats, sine.temperature, sine.normalize, sine.scale) == (4, 20.0, True, 3.0)
    pos = sine(nested(MASK))
    expected = reference_sine(MASK, 4, temperature=20.0, normalize=True, scale=3.0)
    torch.testing.assert_close(pos.double(), expected, atol=1e-5, rtol=0)
    learned = PositionEmbeddingLearned(32)
    assert learned.row_embed.weight.shape == learned.col_embed.weight.shape == (50, 32)


def detr_args(position_embedding: str) -> argparse.Namespace:
    return argparse.Namespace(
        backbone="resnet50",
        hidden_dim=256,
        position_embedding=position_embedding,
        lr_backbone=1e-5,
        masks=False,
        dilation=False,
    )


@pytest.mark.parametrize("name", ["sine", "v2"])
def test_build_position_encoding_detr_sine(name):
    encoding = build_position_encoding(detr_args(name))
    assert type(encoding) is PositionEmbeddingSine
    assert encoding.num_pos_feats == 128 and encoding.normalize is True
    assert encoding.temperature == 10000 and encoding.scale == pytest.approx(2 * math.pi)
    assert encoding.offset == 0 and encoding.eps == 1e-6
    mask = padded_masks(3, 4, [(3, 4), (2, 3)])
    torch.testing.assert_close(
        encoding(nested(mask)).double(), reference_sine(mask, 128, normalize=True), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("name", ["learned", "v3"])
def test_build_position_encoding_detr_learned(name):
    encoding = build_position_encoding(detr_args(name))
    assert type(encoding) is PositionEmbeddingLearned
    assert encoding.row_embed.weight.shape == encoding.col_embed.weight.shape == (50, 128)


def test_build_position_encoding_unknown_name():
    with pytest.raises(ValueError, match="v4"):
        build_position_encoding(detr_args("v4"))
