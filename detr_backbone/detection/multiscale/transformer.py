"""The parts of a deformable transformer that every multi-scale head shares, with Deformable-DETR's module names
so published checkpoints load strictly: the encoder (deformable self-attention over every level), the decoder
layer (self-attention among queries, deformable cross-attention to the memory) and the levels flattened
into one sequence. Sequences are (batch, length, channels); post-norm throughout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..layers import ResidualLayer, clones, with_position
from .attention import MSDeformAttn, SpatialShapes
from .levels import encoder_reference_points, valid_ratios


class DeformableTransformerEncoderLayer(ResidualLayer):
    """Deformable self-attention over every level's positions, then the feed-forward block."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        attention_impl: str = "auto",
    ):
        super().__init__(normalize_before=False)
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, attention_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.add_feedforward(d_model, d_ffn, dropout, activation)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor | None,
        reference_points: Tensor,
        spatial_shapes: SpatialShapes,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        def attend(x: Tensor) -> Tensor:
            return self.self_attn(with_position(x, pos), reference_points, x, spatial_shapes, padding_mask)

        src = self.residual(src, self.norm1, self.dropout1, attend)
        return self.residual(src, self.norm2, self.dropout2, self.feedforward)


class DeformableTransformerDecoderLayer(ResidualLayer):
    """Self-attention among the queries, deformable cross-attention to the memory, feed-forward.

    The norms keep Deformable-DETR's numbering: ``norm2`` after the self-attention, ``norm1``
    after the cross-attention. ``self_attn_mask`` (Q, Q), True where a query may not look (DINO's
    denoising groups).
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        attention_impl: str = "auto",
    ):
        super().__init__(normalize_before=False)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, attention_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.add_feedforward(d_model, d_ffn, dropout, activation)
        self.dropout3 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor | None,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: SpatialShapes,
        memory_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        def attend_queries(x: Tensor) -> Tensor:
            query = key = with_position(x, query_pos)
            return self.self_attn(query, key, x, attn_mask=self_attn_mask, need_weights=False)[0]

        def attend_memory(x: Tensor) -> Tensor:
            query = with_position(x, query_pos)
            return self.cross_attn(query, reference_points, memory, spatial_shapes, memory_padding_mask)

        tgt = self.residual(tgt, self.norm2, self.dropout2, attend_queries)
        tgt = self.residual(tgt, self.norm1, self.dropout1, attend_memory)
        return self.residual(tgt, self.norm3, self.dropout3, self.feedforward)


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    def forward(
        self,
        src: Tensor,
        spatial_shapes: SpatialShapes,
        ratios: Tensor,
        pos: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        reference_points = encoder_reference_points(spatial_shapes, ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class FlatLevels(NamedTuple):
    """The levels as one sequence: maps (B, S, C), padding masks (B, S), positions with their level's
    embedding (B, S, C), each level's (h, w) and valid ratios (B, L, 2)."""

    srcs: Tensor
    masks: Tensor
    positions: Tensor
    spatial_shapes: SpatialShapes
    ratios: Tensor


def flatten_levels(
    srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor], level_embed: Tensor
) -> FlatLevels:
    """Per level a map (B, C, h, w), its padding mask (B, h, w) and positional map (B, C, h, w), as one sequence."""
    # which level a position comes from is told by adding the level's embedding to its position
    return FlatLevels(
        torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1),
        torch.cat([mask.flatten(1) for mask in masks], 1),
        torch.cat([pos.flatten(2).transpose(1, 2) + level_embed[level] for level, pos in enumerate(pos_embeds)], 1),
        [(src.shape[-2], src.shape[-1]) for src in srcs],
        torch.stack([valid_ratios(mask) for mask in masks], 1),
    )
