"""Deformable DETR's transformer, with its module names so its checkpoints load strictly.

Sequences are (batch, length, channels). The encoder's self-attention and the decoder's
cross-attention are multi-scale deformable attention over all levels at once; the decoder's
queries attend to each other with ordinary multi-head attention. Post-norm throughout.
Iterative box refinement and two-stage are switched on by the detector, which hands the decoder
its box heads (``decoder.bbox_embed``) and, for two-stage, its class heads (``decoder.class_embed``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..layers import clones
from ..multiscale.attention import MSDeformAttn, SpatialShapes
from ..multiscale.proposals import encoder_proposals, proposal_position_embedding
from ..multiscale.refinement import offset_reference
from ..multiscale.transformer import (
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
    flatten_levels,
)


class DeformableTransformerDecoder(nn.Module):
    """Stacked decoder layers; returns the outputs (layers or 1, B, Q, C) and the reference points
    each layer leaves for the next (same leading shape; boxes after refinement, else the input points).

    With ``bbox_embed`` set (one box head per layer), each layer moves the reference by its head's
    prediction (iterative refinement) and the references returned are those boxes, with their gradient:
    they are the detector's boxes, computed once. The next layer gets them detached, so each layer
    learns its own step.
    """

    def __init__(
        self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int, return_intermediate: bool = False
    ):
        super().__init__()
        self.layers = clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.return_intermediate = return_intermediate
        # set by the detector, and then part of the state dict under these names, as in Deformable-DETR
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: SpatialShapes,
        ratios: Tensor,
        query_pos: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        output = tgt
        outputs, references = [], []
        for index, layer in enumerate(self.layers):
            # references are relative to the valid image; the attention samples on the padded maps
            scale = ratios if reference_points.shape[-1] == 2 else torch.cat([ratios, ratios], -1)
            sampling_reference = reference_points[:, :, None] * scale[:, None]
            output = layer(output, query_pos, sampling_reference, memory, spatial_shapes, memory_padding_mask)
            refined = reference_points
            if self.bbox_embed is not None:
                refined = offset_reference(self.bbox_embed[index](output), reference_points).sigmoid()
                reference_points = refined.detach()
            if self.return_intermediate or index == self.num_layers - 1:
                outputs.append(output)
                references.append(refined)
        return torch.stack(outputs), torch.stack(references)


class TransformerOutput(NamedTuple):
    """``hs`` (layers, B, Q, C); ``init_reference`` (B, Q, 2 or 4) and ``inter_references`` (layers, B, Q, 2 or 4)
    in [0, 1] of the valid image (with box refinement, each layer's refined boxes, not detached); for
    two-stage, the encoder's proposal logits (B, S, num_classes) and box logits (B, S, 4) (None otherwise)."""

    hs: Tensor
    init_reference: Tensor
    inter_references: Tensor
    enc_outputs_class: Tensor | None
    enc_outputs_coord_unact: Tensor | None


class DeformableTransformer(nn.Module):
    """Encode the projected levels with deformable attention, decode ``num_queries`` object queries.

    ``forward(srcs, masks, pos_embeds, query_embed)``: per level a map (B, C, h, w), its padding mask
    (B, h, w) and positional map (B, C, h, w); ``query_embed`` (Q, 2C) holds each query's position
    embedding then its content, or is None for two-stage, where the best-scored encoder proposals
    make the queries. Returns a ``TransformerOutput``.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        return_intermediate_dec: bool = False,
        num_feature_levels: int = 4,
        dec_n_points: int = 4,
        enc_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
        attention_impl: str = "auto",
    ):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        if d_model % 2:
            raise ValueError(f"d_model must be even (sin/cos pairs in the proposal embedding), got {d_model}")
        if num_decoder_layers < 1:
            raise ValueError(f"the decoder needs at least one layer, got num_decoder_layers={num_decoder_layers}")
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.num_feature_levels = num_feature_levels
        layer_args = (d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead)
        self.encoder = DeformableTransformerEncoder(
            DeformableTransformerEncoderLayer(*layer_args, enc_n_points, attention_impl), num_encoder_layers
        )
        self.decoder = DeformableTransformerDecoder(
            DeformableTransformerDecoderLayer(*layer_args, dec_n_points, attention_impl),
            num_decoder_layers,
            return_intermediate_dec,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()  # its own pattern replaces the xavier matrices above
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def forward(
        self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor], query_embed: Tensor | None = None
    ) -> TransformerOutput:
        if not len(srcs) == len(masks) == len(pos_embeds) == self.num_feature_levels:
            raise ValueError(
                f"the transformer takes {self.num_feature_levels} levels, got {len(srcs)} maps, "
                f"{len(masks)} masks and {len(pos_embeds)} positional maps"
            )
        if (query_embed is None) != self.two_stage:
            raise ValueError("query_embed must be given without two_stage and None with two_stage")
        levels = flatten_levels(srcs, masks, pos_embeds, self.level_embed)
        spatial_shapes, mask_flatten, ratios = levels.spatial_shapes, levels.masks, levels.ratios
        memory = self.encoder(levels.srcs, spatial_shapes, ratios, levels.positions, mask_flatten)

        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            enc_outputs_class, enc_outputs_coord_unact = self.score_proposals(memory, mask_flatten, spatial_shapes)
            query_pos, tgt, reference_points = self.proposal_queries(enc_outputs_class, enc_outputs_coord_unact)
        else:
            query_pos, tgt = query_embed.split(self.d_model, dim=1)
            query_pos = query_pos[None].repeat(memory.shape[0], 1, 1)
            tgt = tgt[None].repeat(memory.shape[0], 1, 1)
            reference_points = self.reference_points(query_pos).sigmoid()
        hs, inter_references = self.decoder(
            tgt, reference_points, memory, spatial_shapes, ratios, query_pos, mask_flatten
        )
        return TransformerOutput(hs, reference_points, inter_references, enc_outputs_class, enc_outputs_coord_unact)

    def score_proposals(
        self, memory: Tensor, padding_mask: Tensor, spatial_shapes: SpatialShapes
    ) -> tuple[Tensor, Tensor]:
        """Two-stage: class logits (B, S, num_classes) and box logits (B, S, 4) of every encoder position's proposal,
        from the decoder's extra last heads; dropped proposals get an ``inf`` box logit (a box at the corner)."""
        if self.decoder.class_embed is None or self.decoder.bbox_embed is None:
            raise ValueError(
                "two_stage reads the proposal heads from decoder.class_embed and decoder.bbox_embed, which are unset: "
                "build the transformer inside DeformableDETR(..., with_box_refine=True, two_stage=True)"
            )
        proposals, keep = encoder_proposals(padding_mask, spatial_shapes)
        output_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(~keep, 0.0)))
        last = self.decoder.num_layers
        return self.decoder.class_embed[last](output_memory), self.decoder.bbox_embed[last](output_memory) + proposals

    def proposal_queries(self, class_logits: Tensor, box_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Two-stage: (query_pos, tgt, reference boxes) of the ``two_stage_num_proposals`` proposals most
        likely to hold an object (class 0's logit: the proposal loss labels every object 0)."""
        count, length = self.two_stage_num_proposals, class_logits.shape[1]
        if count > length:
            raise ValueError(
                f"two_stage takes the best {count} of the encoder's {length} positions as queries: "
                f"use larger images or fewer queries (num_queries <= {length})"
            )
        chosen = torch.topk(class_logits[..., 0], count, dim=1)[1]
        # the decoder starts from the chosen boxes but does not train the encoder's heads through them
        boxes = torch.gather(box_logits, 1, chosen[..., None].expand(-1, -1, 4)).detach()
        # the proposals stay float32 in a bfloat16 model; their embedding takes the layer's dtype
        encoded = proposal_position_embedding(boxes, self.d_model // 2).to(self.pos_trans.weight.dtype)
        embedding = self.pos_trans_norm(self.pos_trans(encoded))
        query_pos, tgt = embedding.split(self.d_model, dim=2)
        return query_pos, tgt, boxes.sigmoid()
