"""DINO's deformable transformer: Deformable DETR's encoder, mixed query selection and an anchor-box decoder.

Mixed query selection: every encoder position proposes a box (two-stage Deformable DETR's
proposals), the encoder's heads score and move them, and the ``num_queries`` best-scored give the
decoder its anchors; the queries' content is learned (``tgt_embed``), not taken from the encoder.
The decoder's queries carry 4-d anchor boxes: each layer's positional query is an MLP of the anchor's
sine embedding, and each layer moves the anchor by its box head (the move detached for the next
layer). Denoising queries, when given, go before the matching queries, with their attention mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..layers import clones
from ..mlp import MLP
from ..multiscale.attention import MSDeformAttn, SpatialShapes
from ..multiscale.proposals import coordinate_sine_embedding, encoder_proposals
from ..multiscale.refinement import inverse_sigmoid
from ..multiscale.transformer import (
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
    flatten_levels,
)

LOGIT_EPS = 1e-3  # DINO's inverse sigmoid clamps boxes to [1e-3, 1 - 1e-3] before the logit


def anchor_sine_embedding(boxes: Tensor, d_model: int) -> Tensor:
    """(..., 2 * d_model): the sine embedding of cxcywh anchors (..., 4), DINO's coordinate order y, x, w, h."""
    return coordinate_sine_embedding(boxes[..., [1, 0, 2, 3]], d_model // 2)


class DinoDecoder(nn.Module):
    """Decoder layers over anchor boxes; ``norm`` is applied to each layer's output for the heads.

    Returns the normed outputs (layers, B, Q, C) and the inverse sigmoid of each layer's anchors (layers of
    (B, Q, 4)): the input ones, then each layer's refined ones, not detached, so a layer's box loss reaches
    the previous layer's box head through its anchor ("look forward twice"). Each anchor's logit is
    computed once and serves both its layer's refinement (detached) and the detector's boxes.
    """

    def __init__(self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers = clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model
        # set by the detector, and then part of the state dict under these names, as in DINO
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt: Tensor,
        anchors: Tensor,
        memory: Tensor,
        spatial_shapes: SpatialShapes,
        ratios: Tensor,
        memory_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        if self.bbox_embed is None:
            raise ValueError(
                "the decoder refines its anchors with decoder.bbox_embed, which is unset: build it in DINO"
            )
        output, outputs, anchor_logits = tgt, [], [inverse_sigmoid(anchors, LOGIT_EPS)]
        for index, layer in enumerate(self.layers):
            # anchors are relative to the valid image; the attention samples on the padded maps
            sampling_anchors = anchors[:, :, None] * torch.cat([ratios, ratios], -1)[:, None]
            # the anchors stay float32 in a bfloat16 model; their embedding takes the queries' dtype
            embedding = anchor_sine_embedding(sampling_anchors[:, :, 0], self.d_model).to(output.dtype)
            query_pos = self.ref_point_head(embedding)
            output = layer(
                output, query_pos, sampling_anchors, memory, spatial_shapes, memory_padding_mask, self_attn_mask
            )
            outputs.append(self.norm(output))
            if index + 1 < self.num_layers:
                refined = (self.bbox_embed[index](output) + anchor_logits[-1].detach()).sigmoid()
                anchors = refined.detach()
                anchor_logits.append(inverse_sigmoid(refined, LOGIT_EPS))
        return torch.stack(outputs), anchor_logits


class DinoTransformerOutput(NamedTuple):
    """``hs`` (layers, B, D + Q, C); ``anchor_logits`` the inverse sigmoid of the anchors before each layer
    (layers of (B, D + Q, 4)); the selected proposals' class logits (B, Q, num_classes) and boxes (B, Q, 4)."""

    hs: Tensor
    anchor_logits: list[Tensor]
    interm_class: Tensor
    interm_boxes: Tensor


class DinoTransformer(nn.Module):
    """``forward(srcs, masks, pos_embeds, dn_content, dn_box_logits, attn_mask)``: per level a map (B, C, h, w),
    its padding mask and positional map; the denoising queries' content (B, D, C) and box logits (B, D, 4)
    with their ``attn_mask`` (D + Q, D + Q), or None. ``enc_out_class_embed`` and ``enc_out_bbox_embed``
    (the proposals' heads) are set by the detector."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_queries: int = 900,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        attention_impl: str = "auto",
    ):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        if d_model % 4:
            raise ValueError(
                f"d_model must be a multiple of 4 (sin/cos pairs of each anchor coordinate), got {d_model}"
            )
        if num_decoder_layers < 1:
            raise ValueError(f"the decoder needs at least one layer, got num_decoder_layers={num_decoder_layers}")
        self.d_model = d_model
        self.nhead = nhead
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        layer_args = (d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead)
        self.encoder = DeformableTransformerEncoder(
            DeformableTransformerEncoderLayer(*layer_args, enc_n_points, attention_impl), num_encoder_layers
        )
        self.decoder = DinoDecoder(
            DeformableTransformerDecoderLayer(*layer_args, dec_n_points, attention_impl), num_decoder_layers, d_model
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.tgt_embed = nn.Embedding(num_queries, d_model)  # the queries' learned content
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_out_class_embed: nn.Linear | None = None
        self.enc_out_bbox_embed: MLP | None = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # as DINO: every matrix xavier (tgt_embed included), then deformable attention's own pattern
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: list[Tensor],
        masks: list[Tensor],
        pos_embeds: list[Tensor],
        dn_content: Tensor | None = None,
        dn_box_logits: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> DinoTransformerOutput:
        if not len(srcs) == len(masks) == len(pos_embeds) == self.num_feature_levels:
            raise ValueError(
                f"the transformer takes {self.num_feature_levels} levels, got {len(srcs)} maps, "
                f"{len(masks)} masks and {len(pos_embeds)} positional maps"
            )
        levels = flatten_levels(srcs, masks, pos_embeds, self.level_embed)
        memory = self.encoder(levels.srcs, levels.spatial_shapes, levels.ratios, levels.positions, levels.masks)
        interm_class, box_logits = self.select_queries(memory, levels.masks, levels.spatial_shapes)
        anchors = (
            box_logits.detach()
        )  # the decoder starts from the chosen boxes without training the encoder through them
        tgt = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
        if dn_content is not None and dn_box_logits is not None:
            anchors = torch.cat([dn_box_logits.to(anchors.dtype), anchors], 1)
            tgt = torch.cat([dn_content.to(tgt.dtype), tgt], 1)
        hs, anchor_logits = self.decoder(
            tgt, anchors.sigmoid(), memory, levels.spatial_shapes, levels.ratios, levels.masks, attn_mask
        )
        return DinoTransformerOutput(hs, anchor_logits, interm_class, box_logits.sigmoid())

    def select_queries(
        self, memory: Tensor, padding_mask: Tensor, spatial_shapes: SpatialShapes
    ) -> tuple[Tensor, Tensor]:
        """Class logits (B, Q, num_classes) and box logits (B, Q, 4) of the ``num_queries`` proposals whose best
        class scores highest."""
        if self.enc_out_class_embed is None or self.enc_out_bbox_embed is None:
            raise ValueError("query selection needs enc_out_class_embed and enc_out_bbox_embed: build it in DINO")
        count, length = self.num_queries, memory.shape[1]
        if count > length:
            raise ValueError(
                f"DINO takes the best {count} of the encoder's {length} positions as queries: "
                f"use larger images or fewer queries (num_queries <= {length})"
            )
        proposals, keep = encoder_proposals(padding_mask, spatial_shapes)
        output_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(~keep, 0.0)))
        class_logits = self.enc_out_class_embed(output_memory)
        box_logits = self.enc_out_bbox_embed(output_memory) + proposals
        chosen = torch.topk(class_logits.max(-1).values, count, dim=1).indices
        return (
            torch.gather(class_logits, 1, chosen[..., None].expand(-1, -1, class_logits.shape[-1])),
            torch.gather(box_logits, 1, chosen[..., None].expand(-1, -1, 4)),
        )
