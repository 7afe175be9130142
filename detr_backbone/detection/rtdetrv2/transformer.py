"""RT-DETRv2's decoder (``RTDETRTransformerv2``), with its module names so its checkpoints load.

Every position of the fused maps proposes a box (two-stage Deformable DETR's proposals); the encoder's heads
score and move them, and the ``num_queries`` best become the queries: their boxes are the first references and
their (detached) encoder features the first content; nothing about the queries is learned. Each decoder layer
(self-attention, deformable cross-attention with ``num_points`` per level, feed-forward; post-norm) moves the
boxes in logit space; a layer's positional query is an MLP of its reference box. In training every layer
predicts, and a layer's boxes are computed from the previous layer's not detached; in evaluation the decoder
stops at ``eval_idx``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..layers import ResidualLayer, clones, with_position
from ..mlp import MLP
from ..multiscale.attention import MSDeformAttn, SpatialShapes
from ..multiscale.criterion import set_prior_bias
from ..multiscale.refinement import inverse_sigmoid
from ..realtime.queries import QuerySelection


class DecoderLayer(ResidualLayer):
    """Self-attention among the queries, deformable cross-attention to the memory, feed-forward, each followed by
    its norm (``norm1``, ``norm2``, ``norm3``). ``attn_mask`` (Q, Q): True where a query may not look."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        num_levels: int,
        num_points: int,
        discrete: bool,
        attention_impl: str,
    ):
        super().__init__(normalize_before=False)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, num_levels, nhead, num_points, attention_impl, discrete)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.add_feedforward(d_model, dim_feedforward, dropout, "relu")
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self,
        target: Tensor,
        reference_boxes: Tensor,
        memory: Tensor,
        spatial_shapes: SpatialShapes,
        attn_mask: Tensor | None,
        query_pos: Tensor,
    ) -> Tensor:
        def attend_queries(x: Tensor) -> Tensor:
            query = key = with_position(x, query_pos)
            return self.self_attn(query, key, x, attn_mask=attn_mask, need_weights=False)[0]

        def attend_memory(x: Tensor) -> Tensor:
            return self.cross_attn(with_position(x, query_pos), reference_boxes, memory, spatial_shapes)

        target = self.residual(target, self.norm1, self.dropout1, attend_queries)
        target = self.residual(target, self.norm2, self.dropout2, attend_memory)
        return self.residual(target, self.norm3, self.dropout4, self.feedforward)


class Decoder(nn.Module):
    """The decoder layers under RT-DETRv2's names (``decoder.decoder.layers.N``); ``RtDetrTransformer.decode`` runs
    them with the heads it owns."""

    def __init__(self, layer: DecoderLayer, num_layers: int, eval_idx: int):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        self.eval_idx = eval_idx % num_layers


class DecoderOutput(NamedTuple):
    """Each predicting layer's class logits (layers, B, D + Q, classes) and boxes (layers, B, D + Q, 4); the
    selected proposals' class logits (B, Q, classes or 1) and boxes (B, Q, 4)."""

    logits: Tensor
    boxes: Tensor
    proposal_logits: Tensor
    proposal_boxes: Tensor


class RtDetrTransformer(QuerySelection, nn.Module):
    """``forward(maps, dn_content, dn_box_logits, attn_mask)``: the encoder's fused maps (B, C, h, w) and the
    denoising queries' content (B, D, C) and box logits (B, D, 4) with their ``attn_mask`` (D + Q, D + Q),
    or None."""

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        num_levels: int,
        num_points: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        num_denoising: int,
        eval_idx: int,
        cross_attn_method: str,
        query_select_method: str,
        attention_impl: str,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.query_select_method = query_select_method
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                OrderedDict(conv=nn.Conv2d(hidden_dim, hidden_dim, 1, bias=False), norm=nn.BatchNorm2d(hidden_dim))
            )
            for _ in range(num_levels)
        )
        layer = DecoderLayer(
            hidden_dim,
            nhead,
            dim_feedforward,
            dropout,
            num_levels,
            num_points,
            cross_attn_method == "discrete",
            attention_impl,
        )
        self.decoder = Decoder(layer, num_layers, eval_idx)
        if num_denoising > 0:
            # the last row is the padding slots' content: zero, and never trained
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            nn.init.normal_(self.denoising_class_embed.weight[:-1])
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.enc_output = nn.Sequential(
            OrderedDict(proj=nn.Linear(hidden_dim, hidden_dim), norm=nn.LayerNorm(hidden_dim))
        )
        self.enc_score_head = nn.Linear(hidden_dim, 1 if query_select_method == "agnostic" else num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_layers))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # as RT-DETRv2: class heads at the focal prior, box heads' last layer zero (boxes start at their
        # proposals), xavier for the projections and the positional MLP
        for score_head in (self.enc_score_head, *self.dec_score_head):
            set_prior_bias(score_head)
        for bbox_head in (self.enc_bbox_head, *self.dec_bbox_head):
            nn.init.constant_(bbox_head.layers[-1].weight, 0)
            nn.init.constant_(bbox_head.layers[-1].bias, 0)
        nn.init.xavier_uniform_(self.enc_output.proj.weight)
        for linear in self.query_pos_head.layers:
            nn.init.xavier_uniform_(linear.weight)
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection.conv.weight)

    def forward(
        self,
        maps: Sequence[Tensor],
        dn_content: Tensor | None = None,
        dn_box_logits: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> DecoderOutput:
        if len(maps) != len(self.input_proj):
            raise ValueError(f"the decoder takes {len(self.input_proj)} levels, got {len(maps)}")
        projected = [projection(level) for projection, level in zip(self.input_proj, maps)]
        memory = torch.cat([level.flatten(2).transpose(1, 2) for level in projected], 1)
        spatial_shapes = [(level.shape[-2], level.shape[-1]) for level in projected]
        content, box_logits, proposal_logits = self.select_queries(memory, spatial_shapes)
        proposal_boxes = box_logits.sigmoid()
        content, box_logits = content.detach(), box_logits.detach()
        if dn_content is not None and dn_box_logits is not None:
            content = torch.cat([dn_content.to(content.dtype), content], 1)
            box_logits = torch.cat([dn_box_logits.to(box_logits.dtype), box_logits], 1)
        logits, boxes = self.decode(content, box_logits, memory, spatial_shapes, attn_mask)
        return DecoderOutput(logits, boxes, proposal_logits, proposal_boxes)

    def decode(
        self,
        content: Tensor,
        box_logits: Tensor,
        memory: Tensor,
        spatial_shapes: SpatialShapes,
        attn_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        references = box_logits.sigmoid()
        previous = references  # the last layer's boxes, with their graph (training's look-forward-twice)
        output, logits, boxes = content, [], []
        last = self.decoder.num_layers - 1 if self.training else self.decoder.eval_idx
        for index, layer in enumerate(self.decoder.layers[: last + 1]):
            query_pos = self.query_pos_head(references.to(output.dtype))
            output = layer(output, references[:, :, None], memory, spatial_shapes, attn_mask, query_pos)
            delta = self.dec_bbox_head[index](output)
            refined = (delta + inverse_sigmoid(references)).sigmoid()
            if self.training:
                logits.append(self.dec_score_head[index](output))
                boxes.append(refined if index == 0 else (delta + inverse_sigmoid(previous)).sigmoid())
            elif index == last:
                logits.append(self.dec_score_head[index](output))
                boxes.append(refined)
            previous, references = refined, refined.detach()
        return torch.stack(logits), torch.stack(boxes)
