"""DETR's encoder-decoder transformer, with DETR's module names so its checkpoints load strictly.

Sequences are (length, batch, channels), as in DETR. Positional maps are added to the queries and
keys of every attention, never to the values: the features carry content, the maps only steer
where to look. Post-norm by default (DETR's weights); ``normalize_before`` gives the pre-norm
variant, whose encoder then ends with its own LayerNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import ResidualLayer, clones, with_position


class TransformerEncoderLayer(ResidualLayer):
    """Self-attention over the feature map, then the feed-forward block."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__(normalize_before)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.add_feedforward(d_model, dim_feedforward, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
    ) -> Tensor:
        def attend(x: Tensor) -> Tensor:
            query = key = with_position(x, pos)
            return self.self_attn(
                query, key, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask, need_weights=False
            )[0]

        src = self.residual(src, self.norm1, self.dropout1, attend)
        return self.residual(src, self.norm2, self.dropout2, self.feedforward)


class TransformerDecoderLayer(ResidualLayer):
    """Self-attention among the object queries, cross-attention to the encoder memory, feed-forward."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__(normalize_before)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.add_feedforward(d_model, dim_feedforward, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        def attend_queries(x: Tensor) -> Tensor:
            query = key = with_position(x, query_pos)
            return self.self_attn(
                query, key, x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask, need_weights=False
            )[0]

        def attend_memory(x: Tensor) -> Tensor:
            return self.multihead_attn(
                with_position(x, query_pos),
                with_position(memory, pos),
                memory,
                attn_mask=memory_mask,
                key_padding_mask=memory_key_padding_mask,
                need_weights=False,
            )[0]

        tgt = self.residual(tgt, self.norm1, self.dropout1, attend_queries)
        tgt = self.residual(tgt, self.norm2, self.dropout2, attend_memory)
        return self.residual(tgt, self.norm3, self.dropout3, self.feedforward)


class TransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm: nn.Module | None = None):
        super().__init__()
        self.layers = clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
    ) -> Tensor:
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return output if self.norm is None else self.norm(output)


class TransformerDecoder(nn.Module):
    """Stacked decoder layers; returns (layers, Q, B, C) when ``return_intermediate``, else (1, Q, B, C).

    Every returned layer output goes through the final ``norm``, so auxiliary heads see the
    same normalisation as the last one.
    """

    def __init__(
        self,
        decoder_layer: TransformerDecoderLayer,
        num_layers: int,
        norm: nn.Module | None = None,
        return_intermediate: bool = False,
    ):
        super().__init__()
        self.layers = clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        output = tgt
        normalized = []
        for index, layer in enumerate(self.layers):
            output = layer(
                output,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                pos=pos,
                query_pos=query_pos,
            )
            if self.return_intermediate or index == self.num_layers - 1:
                normalized.append(output if self.norm is None else self.norm(output))
        return torch.stack(normalized)


class Transformer(nn.Module):
    """DETR's transformer: encode the flattened feature map, decode ``query_embed`` object queries.

    ``forward(src (B, C, H, W), mask (B, H, W) True = padding, query_embed (Q, C), pos_embed
    (B, C, H, W))`` returns ``hs`` (decoder layers or 1, B, Q, C) and ``memory`` (B, C, H, W).
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
        return_intermediate_dec: bool = False,
    ):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        if num_decoder_layers < 1:
            raise ValueError(f"the decoder needs at least one layer, got num_decoder_layers={num_decoder_layers}")
        layer_args = (d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(*layer_args),
            num_encoder_layers,
            nn.LayerNorm(d_model) if normalize_before else None,  # post-norm layers already end normalised
        )
        self.decoder = TransformerDecoder(
            TransformerDecoderLayer(*layer_args),
            num_decoder_layers,
            nn.LayerNorm(d_model),
            return_intermediate=return_intermediate_dec,
        )
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor) -> tuple[Tensor, Tensor]:
        batch, channels, height, width = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).expand(-1, batch, -1)
        mask = mask.flatten(1)
        # the queries carry no content at first: what they are is their learned position
        tgt = torch.zeros_like(query_embed)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).reshape(batch, channels, height, width)


def build_transformer(
    d_model: int = 256,
    nhead: int = 8,
    num_encoder_layers: int = 6,
    num_decoder_layers: int = 6,
    dim_feedforward: int = 2048,
    dropout: float = 0.1,
    normalize_before: bool = False,
    return_intermediate_dec: bool = True,
) -> Transformer:
    """A transformer with DETR's training defaults (d_model 256, every decoder layer returned for aux losses)."""
    return Transformer(
        d_model,
        nhead,
        num_encoder_layers,
        num_decoder_layers,
        dim_feedforward,
        dropout,
        normalize_before=normalize_before,
        return_intermediate_dec=return_intermediate_dec,
    )
