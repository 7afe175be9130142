"""D-FINE's decoder (``DFINETransformer``), with its module names so its checkpoints load.

Queries are selected from the encoder as in RT-DETR (``realtime.queries``). The first layer's output also
moves the selected boxes once more (``pre_bbox_head``): those boxes are the references every later box is
measured from. Each layer then predicts the four edges as distributions over ``reg_max + 1`` bins, added to the
previous layer's bin logits (fine-grained distribution refinement), and its box is the reference moved by the
expected edges (``distribution``). A layer's class logits get a location-quality term from the top
probabilities of its edge distributions (``LQE``). The cross-attention reads the memory itself (no value or
output projection), with its own number of points on each level, and a gate mixes its result into the query.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import ACTIVATIONS, with_position
from ..mlp import MLP
from ..multiscale.criterion import set_prior_bias
from ..multiscale.refinement import inverse_sigmoid
from ..multiscale.sampling import SpatialShapes, multi_scale_deformable_attention, resolve_attention_impl
from ..multiscale.sampling.discrete import discrete_attention
from ..realtime.queries import QuerySelection
from .distribution import distances_to_boxes, expected_distances, weighting_function

FP16_LIMIT = 65504.0  # D-FINE clamps each layer's output to float16's range before the last norm
QUALITY_TOP_K = 4  # LQE reads each edge's 4 largest bin probabilities and their mean
QUALITY_HIDDEN = 64
UP = 0.5  # the weighting function's reach, with reg_scale: ±up * reg_scale next to the ends


class DeformableAttention(nn.Module):
    """D-FINE's ``MSDeformableAttention``: ``num_points[l]`` points per head on level l around a reference box,
    offsets in units of half the box over the level's count; no value or output projection.

    ``forward(query (B, Q, C), reference (B, Q, 1, 4), value (B, S, M, C / M), spatial_shapes)``. Levels with
    fewer points than the most are padded with points of zero weight, so the shared cores (which take one count
    for every level) read them."""

    def __init__(self, d_model: int, n_heads: int, num_points: Sequence[int], discrete: bool, attention_impl: str):
        super().__init__()
        resolve_attention_impl(attention_impl)
        self.n_heads = n_heads
        self.num_points = list(num_points)
        self.attention_impl = attention_impl
        self.discrete = discrete
        total = sum(self.num_points)
        self.sampling_offsets = nn.Linear(d_model, n_heads * total * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * total)
        # each point's offset unit: half the box over its level's count
        scale = [0.5 / count for count in self.num_points for _ in range(count)]
        self.register_buffer("offset_scale", torch.tensor(scale).view(total, 1), persistent=False)
        self._reset_parameters()
        self.sampling_offsets.requires_grad_(not discrete)

    def _reset_parameters(self) -> None:
        # head h looks along angle 2*pi*h/M, a level's points 1, 2, ... steps out (D-FINE's initial pattern)
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        steps = torch.cat([torch.arange(1, count + 1, dtype=torch.float32) for count in self.num_points])
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((directions[:, None, :] * steps[None, :, None]).flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)

    def forward(self, query: Tensor, reference: Tensor, value: Tensor, spatial_shapes: SpatialShapes) -> Tensor:
        batch, queries, _ = query.shape
        total = sum(self.num_points)
        offsets = self.sampling_offsets(query).view(batch, queries, self.n_heads, total, 2)
        weights = self.attention_weights(query).view(batch, queries, self.n_heads, total).softmax(-1)
        boxes = reference[:, :, None, :, :]  # (B, Q, 1, 1, 4)
        locations = boxes[..., :2] + offsets * self.offset_scale.to(offsets.dtype) * boxes[..., 2:]
        locations, weights = self.per_level(locations, weights)
        if self.discrete:
            return discrete_attention(value, spatial_shapes, locations, weights)
        return multi_scale_deformable_attention(value, spatial_shapes, locations, weights, self.attention_impl)

    def per_level(self, locations: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Q, M, L, P, 2) locations and (B, Q, M, L, P) weights from the points of all levels in a row,
        P the most points of a level; a level's missing points sit at its centre with weight 0."""
        most = max(self.num_points)
        if all(count == most for count in self.num_points):
            shape = (*weights.shape[:3], len(self.num_points), most)
            return locations.reshape(*shape, 2), weights.reshape(shape)
        padded_locations, padded_weights = [], []
        for level_locations, level_weights in zip(
            locations.split(self.num_points, 3), weights.split(self.num_points, 3)
        ):
            missing = most - level_weights.shape[-1]
            padded_locations.append(F.pad(level_locations, (0, 0, 0, missing), value=0.5))
            padded_weights.append(F.pad(level_weights, (0, missing)))
        return torch.stack(padded_locations, 3), torch.stack(padded_weights, 3)


class Gate(nn.Module):
    """Mixes the cross-attention's result into the query with two sigmoid gates (at first 0.5 each), then norms."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gate = nn.Linear(2 * d_model, 2 * d_model)
        nn.init.constant_(self.gate.bias, 0.0)  # sigmoid(0) = 0.5: D-FINE's initial mix
        nn.init.constant_(self.gate.weight, 0.0)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, query: Tensor, attended: Tensor) -> Tensor:
        gates = torch.sigmoid(self.gate(torch.cat([query, attended], -1)))
        keep, take = gates.chunk(2, -1)
        return self.norm(keep * query + take * attended)


class DecoderLayer(nn.Module):
    """Self-attention (post-norm ``norm1``), gated deformable cross-attention (``gateway``), feed-forward
    (``norm3``). ``attn_mask`` (Q, Q): True where a query may not look."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        num_points: Sequence[int],
        activation: str,
        discrete: bool,
        attention_impl: str,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = DeformableAttention(d_model, nhead, num_points, discrete, attention_impl)
        self.dropout2 = nn.Dropout(dropout)
        self.gateway = Gate(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = ACTIVATIONS[activation]
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self,
        target: Tensor,
        reference: Tensor,
        value: Tensor,
        spatial_shapes: SpatialShapes,
        attn_mask: Tensor | None,
        query_pos: Tensor,
    ) -> Tensor:
        query = key = with_position(target, query_pos)
        attended = self.self_attn(query, key, target, attn_mask=attn_mask, need_weights=False)[0]
        target = self.norm1(target + self.dropout1(attended))
        attended = self.cross_attn(with_position(target, query_pos), reference, value, spatial_shapes)
        target = self.gateway(target, self.dropout2(attended))
        fed = self.linear2(self.dropout3(self.activation(self.linear1(target))))
        return self.norm3((target + self.dropout4(fed)).clamp(-FP16_LIMIT, FP16_LIMIT))


class LocationQuality(nn.Module):
    """D-FINE's ``LQE``: a score term from how peaked the edges' distributions are (each edge's top-4
    probabilities and their mean, through a 2-layer MLP that starts at zero)."""

    def __init__(self, reg_max: int, activation: str):
        super().__init__()
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (QUALITY_TOP_K + 1), QUALITY_HIDDEN, 1, 2, activation)
        nn.init.constant_(self.reg_conf.layers[-1].weight, 0.0)
        nn.init.constant_(self.reg_conf.layers[-1].bias, 0.0)

    def forward(self, logits: Tensor, corners: Tensor) -> Tensor:
        batch, queries, _ = corners.shape
        probabilities = corners.reshape(batch, queries, 4, self.reg_max + 1).softmax(-1)
        top = probabilities.topk(QUALITY_TOP_K, dim=-1).values
        statistics = torch.cat([top, top.mean(-1, keepdim=True)], -1).reshape(batch, queries, -1)
        return logits + self.reg_conf(statistics)


class Decoder(nn.Module):
    """The layers and quality heads under D-FINE's names (``decoder.decoder.layers.N``, ``.lqe_layers.N``); it
    also holds ``up`` and ``reg_scale``, as D-FINE's does (so its state dict has them twice).
    ``DFineTransformer.decode`` runs them with the heads it owns."""

    def __init__(self, layers: nn.ModuleList, lqe_layers: nn.ModuleList, up: nn.Parameter, reg_scale: nn.Parameter):
        super().__init__()
        self.layers = layers
        self.lqe_layers = lqe_layers
        self.up = up
        self.reg_scale = reg_scale


class DFineOutput(NamedTuple):
    """Per predicting layer (layers, B, D + Q, ...): class logits, boxes, edge-bin logits; the references the
    edges are measured from (B, D + Q, 4); the first layer's pre-head logits and boxes (B, D + Q, ...); the
    selected proposals' class logits and boxes (B, Q, ...)."""

    logits: Tensor
    boxes: Tensor
    corners: Tensor
    references: Tensor
    pre_logits: Tensor
    pre_boxes: Tensor
    proposal_logits: Tensor
    proposal_boxes: Tensor


class DFineTransformer(QuerySelection, nn.Module):
    """``forward(maps, dn_content, dn_box_logits, attn_mask)``: the encoder's fused maps (B, hidden_dim, h, w)
    and the denoising queries' content (B, D, C) and box logits (B, D, 4) with their ``attn_mask``, or None."""

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        num_points: Sequence[int],
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        num_denoising: int,
        eval_idx: int,
        cross_attn_method: str,
        query_select_method: str,
        reg_max: int,
        reg_scale: float,
        layer_scale: float,
        activation: str,
        mlp_activation: str,
        attention_impl: str,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.num_levels = len(num_points)
        self.query_select_method = query_select_method
        self.reg_max = reg_max
        self.layer_scale = layer_scale
        self.eval_idx = eval_idx % num_layers
        self.num_layers = num_layers
        # fixed parameters, as D-FINE keeps them (its checkpoints hold them)
        self.up = nn.Parameter(torch.tensor([UP]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([float(reg_scale)]), requires_grad=False)
        # the layers after eval_idx only train (D-FINE's auxiliary layers), layer_scale times as wide
        widths = [hidden_dim] * (self.eval_idx + 1) + [round(layer_scale * hidden_dim)] * (
            num_layers - self.eval_idx - 1
        )
        feedforward = [dim_feedforward] * (self.eval_idx + 1) + [round(layer_scale * dim_feedforward)] * (
            num_layers - self.eval_idx - 1
        )
        discrete = cross_attn_method == "discrete"
        layers = nn.ModuleList(
            DecoderLayer(width, nhead, ff, dropout, num_points, activation, discrete, attention_impl)
            for width, ff in zip(widths, feedforward)
        )
        quality = nn.ModuleList(LocationQuality(reg_max, activation) for _ in range(num_layers))
        self.decoder = Decoder(layers, quality, self.up, self.reg_scale)
        if num_denoising > 0:
            # the last row is the padding slots' content: zero, and never trained
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            nn.init.normal_(self.denoising_class_embed.weight[:-1])
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2, mlp_activation)
        self.enc_output = nn.Sequential(
            OrderedDict(proj=nn.Linear(hidden_dim, hidden_dim), norm=nn.LayerNorm(hidden_dim))
        )
        self.enc_score_head = nn.Linear(hidden_dim, 1 if query_select_method == "agnostic" else num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, mlp_activation)
        self.dec_score_head = nn.ModuleList(nn.Linear(width, num_classes) for width in widths)
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, mlp_activation)
        self.dec_bbox_head = nn.ModuleList(MLP(width, width, 4 * (reg_max + 1), 3, mlp_activation) for width in widths)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # as D-FINE: class heads at the focal prior, box heads' last layer zero (boxes and edges start at their
        # references), xavier for the encoder's projection and the positional MLP
        for score_head in (self.enc_score_head, *self.dec_score_head):
            set_prior_bias(score_head)
        for bbox_head in (self.enc_bbox_head, self.pre_bbox_head, *self.dec_bbox_head):
            nn.init.constant_(bbox_head.layers[-1].weight, 0)
            nn.init.constant_(bbox_head.layers[-1].bias, 0)
        nn.init.xavier_uniform_(self.enc_output.proj.weight)
        for linear in self.query_pos_head.layers:
            nn.init.xavier_uniform_(linear.weight)

    def forward(
        self,
        maps: Sequence[Tensor],
        dn_content: Tensor | None = None,
        dn_box_logits: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> DFineOutput:
        if len(maps) != self.num_levels:
            raise ValueError(f"the decoder takes {self.num_levels} levels, got {len(maps)}")
        memory = torch.cat([level.flatten(2).transpose(1, 2) for level in maps], 1)
        spatial_shapes = [(level.shape[-2], level.shape[-1]) for level in maps]
        content, box_logits, proposal_logits = self.select_queries(memory, spatial_shapes)
        proposal_boxes = box_logits.sigmoid()
        content, box_logits = content.detach(), box_logits.detach()
        if dn_content is not None and dn_box_logits is not None:
            content = torch.cat([dn_content.to(content.dtype), content], 1)
            box_logits = torch.cat([dn_box_logits.to(box_logits.dtype), box_logits], 1)
        return DFineOutput(
            *self.decode(content, box_logits, memory, spatial_shapes, attn_mask), proposal_logits, proposal_boxes
        )

    def heads_value(self, memory: Tensor, width: int) -> Tensor:
        """The memory as the attention's value (B, S, M, width / M), widened for the auxiliary layers."""
        if memory.shape[-1] != width:
            memory = F.interpolate(memory, size=width)
        return memory.view(*memory.shape[:2], self.decoder.layers[0].cross_attn.n_heads, -1)

    def decode(
        self,
        content: Tensor,
        box_logits: Tensor,
        memory: Tensor,
        spatial_shapes: SpatialShapes,
        attn_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        project = weighting_function(self.reg_max, self.up, self.reg_scale)
        value = self.heads_value(memory, self.hidden_dim)
        references = box_logits.sigmoid()  # each layer's input boxes, detached
        output, output_detached, previous_corners = content, 0, 0
        logits, boxes, corners = [], [], []
        last = self.num_layers - 1 if self.training else self.eval_idx
        for index, layer in enumerate(self.decoder.layers[: last + 1]):
            query_pos = self.query_pos_head(references.to(output.dtype)).clamp(-10, 10)
            if index > self.eval_idx and self.layer_scale != 1:
                query_pos = F.interpolate(query_pos, scale_factor=self.layer_scale)
                value = self.heads_value(memory, query_pos.shape[-1])
                output = F.interpolate(output, size=query_pos.shape[-1])
                output_detached = output.detach()
            output = layer(output, references[:, :, None], value, spatial_shapes, attn_mask, query_pos)
            if index == 0:
                # the first layer moves the selected boxes once more: the references of every layer's edges
                pre_boxes = (self.pre_bbox_head(output) + inverse_sigmoid(references)).sigmoid()
                pre_logits = self.dec_score_head[0](output)
                initial = pre_boxes.detach()
            # each layer adds to the previous layer's bin logits (with their graph), reading its own output
            # plus the previous output detached
            layer_corners = self.dec_bbox_head[index](output + output_detached) + previous_corners
            layer_boxes = distances_to_boxes(initial, expected_distances(layer_corners, project), self.reg_scale)
            if self.training or index == last:
                scores = self.decoder.lqe_layers[index](self.dec_score_head[index](output), layer_corners)
                logits.append(scores)
                boxes.append(layer_boxes)
                corners.append(layer_corners)
            previous_corners = layer_corners
            references = layer_boxes.detach()
            output_detached = output.detach()
        return torch.stack(logits), torch.stack(boxes), torch.stack(corners), initial, pre_logits, pre_boxes
