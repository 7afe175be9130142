"""The RT-DETRv2 detector: the Joiner's body -> the hybrid encoder -> RT-DETRv2's decoder -> sigmoid classes and
boxes, with contrastive denoising queries while training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ...joiner import Joiner
from ...nested_tensor import NestedTensor
from ..head import layer_outputs
from ..realtime.detector import RealTimeDetector
from ..realtime.hybrid_encoder import HybridEncoder
from .transformer import RtDetrTransformer


class RTDETRv2(RealTimeDetector):
    """RT-DETRv2: in training the outputs also hold ``aux_outputs`` (the earlier layers), ``interm_outputs`` (the
    selected proposals; with ``query_select_method=agnostic`` ``enc_outputs``, one objectness logit each) and, with
    targets and ``dn_number`` > 0, ``dn_outputs`` and ``dn_meta`` (the denoising queries)."""

    def forward(
        self, samples: NestedTensor | Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Any]:
        maps = self.fused_maps(samples)
        dn, dn_content, dn_box_logits, attn_mask = self.denoising_inputs(targets)
        logits, boxes, proposal_logits, proposal_boxes = self.decoder(maps, dn_content, dn_box_logits, attn_mask)
        if not self.training:
            return {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        denoised = 0 if dn is None else dn.num_queries
        out = layer_outputs(logits[:, :, denoised:], boxes[:, :, denoised:], self.aux_loss)
        out[self.proposal_key()] = {"pred_logits": proposal_logits, "pred_boxes": proposal_boxes}
        if dn is None:
            return self.with_denoising_table(out)
        out["dn_outputs"] = layer_outputs(logits[:, :, :denoised], boxes[:, :, :denoised], self.aux_loss)
        out["dn_meta"] = dn
        return out


def build_rtdetrv2(
    *,
    backbone: Joiner,
    num_classes: int,
    hidden_dim: int,
    num_queries: int,
    enc_layers: int,
    dec_layers: int,
    nheads: int,
    dim_feedforward: int,
    enc_dim_feedforward: int | None,
    dropout: float,
    num_feature_levels: int,
    expansion: float,
    depth_mult: float,
    num_points: int,
    cross_attn_method: str,
    query_select_method: str,
    eval_idx: int,
    aux_loss: bool,
    dn_number: int,
    dn_label_noise_ratio: float,
    dn_box_noise_scale: float,
    num_select: int,
    attention_impl: str,
) -> RTDETRv2:
    """RT-DETRv2 on the Joiner ``backbone`` (its defaults: ``RtDetrV2Config``); ``hidden_dim`` is the encoder's
    and decoder's width."""
    channels = list(backbone[0].feature_channels)
    if len(channels) != num_feature_levels:
        raise ValueError(
            f"model.num_feature_levels={num_feature_levels} but the backbone returns {len(channels)} levels "
            f"({channels} channels); RT-DETRv2 fuses exactly the levels the backbone returns"
        )
    encoder = HybridEncoder(
        channels, hidden_dim, nheads, enc_dim_feedforward or dim_feedforward, dropout, enc_layers, expansion, depth_mult
    )
    decoder = RtDetrTransformer(
        num_classes=num_classes,
        hidden_dim=hidden_dim,
        num_queries=num_queries,
        num_levels=num_feature_levels,
        num_points=num_points,
        nhead=nheads,
        num_layers=dec_layers,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        num_denoising=dn_number,
        eval_idx=eval_idx,
        cross_attn_method=cross_attn_method,
        query_select_method=query_select_method,
        attention_impl=attention_impl,
    )
    return RTDETRv2(
        backbone,
        encoder,
        decoder,
        num_classes,
        aux_loss,
        dn_number,
        dn_label_noise_ratio,
        dn_box_noise_scale,
        num_select,
    )
