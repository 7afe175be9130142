"""Query selection of the real-time heads (RT-DETR's, kept by D-FINE): every position of the fused maps proposes a
box (two-stage Deformable DETR's proposals), the encoder's heads score and move them, and the ``num_queries``
best become the queries; nothing about the queries is learned."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..multiscale.proposals import encoder_proposals
from ..multiscale.sampling import SpatialShapes


class QuerySelection:
    """For a decoder module with ``enc_output`` (Linear + LayerNorm), ``enc_score_head``, ``enc_bbox_head``,
    ``num_queries`` and ``query_select_method``."""

    enc_output: nn.Module
    enc_score_head: nn.Module
    enc_bbox_head: nn.Module
    num_queries: int
    query_select_method: str

    def select_queries(self, memory: Tensor, spatial_shapes: SpatialShapes) -> tuple[Tensor, Tensor, Tensor]:
        """The ``num_queries`` best proposals' encoder features (B, Q, C), box logits (B, Q, 4) and class
        logits (B, Q, classes or 1)."""
        count, length = self.num_queries, memory.shape[1]
        if count > length:
            raise ValueError(
                f"the head takes the best {count} of the encoder's {length} positions as queries: "
                f"use larger images or fewer queries (num_queries <= {length})"
            )
        no_padding = torch.zeros(memory.shape[:2], dtype=torch.bool, device=memory.device)
        proposals, keep = encoder_proposals(no_padding, spatial_shapes)
        output_memory = self.enc_output(memory * keep.to(memory.dtype))
        class_logits = self.enc_score_head(output_memory)
        if self.query_select_method == "one2many":
            # the best (position, class) pairs, a position as often as it has good classes
            flat = torch.topk(class_logits.flatten(1), count, dim=1).indices
            chosen = torch.div(flat, class_logits.shape[-1], rounding_mode="floor")
        else:
            chosen = torch.topk(class_logits.max(-1).values, count, dim=1).indices

        def take(values: Tensor) -> Tensor:
            return values.gather(1, chosen[..., None].expand(-1, -1, values.shape[-1]))

        # the box head moves only the chosen proposals (row by row, so the same as RT-DETR's and D-FINE's on every position)
        content = take(output_memory)
        return content, self.enc_bbox_head(content) + take(proposals), take(class_logits)
