"""The D-FINE detector: the Joiner's body -> the hybrid encoder (GELAN fusion) -> D-FINE's decoder -> sigmoid classes
and boxes refined as distributions, with contrastive denoising queries while training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ...joiner import Joiner
from ...nested_tensor import NestedTensor
from ..realtime.detector import RealTimeDetector
from ..realtime.hybrid_encoder import HybridEncoder
from .decoder import DFineOutput, DFineTransformer


def layer_prediction(result: DFineOutput, layer: int, queries: slice) -> dict[str, Tensor]:
    """One decoder layer's prediction for some of the queries, with the boxes its edges are measured from."""
    return {
        "pred_logits": result.logits[layer, :, queries],
        "pred_boxes": result.boxes[layer, :, queries],
        "pred_corners": result.corners[layer, :, queries],
        "ref_points": result.references[:, queries],
    }


def taught(result: DFineOutput, layers: range, queries: slice) -> list[dict[str, Tensor]]:
    """The predictions of ``layers``, each with the last layer's edges and logits as its distillation teacher."""
    teacher = {"teacher_corners": result.corners[-1, :, queries], "teacher_logits": result.logits[-1, :, queries]}
    return [{**layer_prediction(result, layer, queries), **teacher} for layer in layers]


def pre_prediction(result: DFineOutput, queries: slice) -> dict[str, Tensor]:
    return {"pred_logits": result.pre_logits[:, queries], "pred_boxes": result.pre_boxes[:, queries]}


class DFINE(RealTimeDetector):
    """D-FINE: in training the outputs also hold ``pred_corners`` (the edges' bin logits), ``ref_points`` (the
    boxes the edges are measured from), ``aux_outputs`` (the earlier layers, with the last layer as their
    distillation teacher), ``pre_outputs`` (the first layer's pre-head), the selected proposals
    (``interm_outputs``, or ``enc_outputs`` with ``query_select_method=agnostic``), ``up`` and ``reg_scale``, and
    with denoising ``dn_outputs`` (every layer), ``dn_pre_outputs`` and ``dn_meta``."""

    def forward(
        self, samples: NestedTensor | Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Any]:
        maps = self.fused_maps(samples)
        dn, dn_content, dn_box_logits, attn_mask = self.denoising_inputs(targets)
        result = self.decoder(maps, dn_content, dn_box_logits, attn_mask)
        if not self.training:
            return {"pred_logits": result.logits[-1], "pred_boxes": result.boxes[-1]}
        denoised = 0 if dn is None else dn.num_queries
        matched, layers = slice(denoised, None), len(result.logits)
        out = layer_prediction(result, -1, matched)
        if self.aux_loss:
            out["aux_outputs"] = taught(result, range(layers - 1), matched)
        out["pre_outputs"] = pre_prediction(result, matched)
        out[self.proposal_key()] = {"pred_logits": result.proposal_logits, "pred_boxes": result.proposal_boxes}
        out["up"], out["reg_scale"] = self.decoder.up, self.decoder.reg_scale
        if dn is None:
            return self.with_denoising_table(out)
        # every layer of the denoising queries is taught by their last (its own distillation term is zero)
        noised = slice(0, denoised)
        out["dn_outputs"] = taught(result, range(layers), noised)
        out["dn_pre_outputs"] = pre_prediction(result, noised)
        out["dn_meta"] = dn
        return out


def build_dfine(
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
    num_points: Sequence[int],
    cross_attn_method: str,
    query_select_method: str,
    eval_idx: int,
    aux_loss: bool,
    dn_number: int,
    dn_label_noise_ratio: float,
    dn_box_noise_scale: float,
    num_select: int,
    attention_impl: str,
    reg_max: int,
    reg_scale: float,
    layer_scale: float,
    activation: str,
    mlp_activation: str,
) -> DFINE:
    """D-FINE on the Joiner ``backbone`` (its defaults: ``DFineConfig``); ``hidden_dim`` is the encoder's and
    decoder's width."""
    channels = list(backbone[0].feature_channels)
    if len(channels) != num_feature_levels or len(num_points) != num_feature_levels:
        raise ValueError(
            f"model.num_feature_levels={num_feature_levels} and model.num_points={list(num_points)} must match the "
            f"backbone's {len(channels)} levels ({channels} channels); D-FINE fuses exactly the levels it returns"
        )
    encoder = HybridEncoder(
        channels,
        hidden_dim,
        nheads,
        enc_dim_feedforward or dim_feedforward,
        dropout,
        enc_layers,
        expansion,
        depth_mult,
        fusion="gelan",
    )
    decoder = DFineTransformer(
        num_classes=num_classes,
        hidden_dim=hidden_dim,
        num_queries=num_queries,
        num_points=list(num_points),
        nhead=nheads,
        num_layers=dec_layers,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        num_denoising=dn_number,
        eval_idx=eval_idx,
        cross_attn_method=cross_attn_method,
        query_select_method=query_select_method,
        reg_max=reg_max,
        reg_scale=reg_scale,
        layer_scale=layer_scale,
        activation=activation,
        mlp_activation=mlp_activation,
        attention_impl=attention_impl,
    )
    return DFINE(
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
