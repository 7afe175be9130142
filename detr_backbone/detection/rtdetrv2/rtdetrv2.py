"""The RT-DETRv2 detector: the Joiner's body -> the hybrid encoder -> RT-DETRv2's decoder -> sigmoid classes and
boxes, with contrastive denoising queries while training. Its attributes are RT-DETRv2's (``encoder``,
``decoder``), so its published checkpoints load once the backbone's names are mapped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...joiner import Joiner
from ...nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from ..head import layer_outputs
from ..multiscale.denoising import DenoisingHead
from ..multiscale.postprocess import topk_detections
from ..multiscale.refinement import inverse_sigmoid
from ..postprocess import Detections
from ..realtime.hybrid_encoder import HybridEncoder
from .transformer import RtDetrTransformer

PADDING_BOX = 0.0  # RT-DETRv2's padding slots hold an all-zero box (its logit clamped to log(1e-5))


class RTDETRv2(DenoisingHead, nn.Module):
    """Predicts ``num_queries`` (classes, box) pairs per image with one sigmoid score per class.

    ``forward(samples, targets=None)`` returns ``pred_logits`` (B, Q, num_classes) and ``pred_boxes`` (B, Q, 4)
    normalised (cx, cy, w, h): in evaluation the ``eval_idx`` decoder layer's. In training also
    ``aux_outputs`` (the earlier layers), ``interm_outputs`` (the selected proposals; with
    ``query_select_method=agnostic`` ``enc_outputs``, one objectness logit each) and, with targets and
    ``dn_number`` > 0, ``dn_outputs`` and ``dn_meta`` (the denoising queries). RT-DETR uses no padding mask:
    images of a batch share one size (its input record resizes every image to a square).
    The Joiner's positional maps are not used: the encoder encodes positions on the one level it attends over.
    """

    TRAINS_ON_TARGETS: ClassVar[bool] = True
    OUTPUTS: ClassVar[Mapping[str, str]] = {
        "pred_logits": "(batch, queries, classes) sigmoid class logits, one per class, no 'no object' class",
        "pred_boxes": "(batch, queries, 4) boxes as (cx, cy, w, h) relative to each image",
        "scores": "(batch, K) sigmoid scores of the K = min(num_select, queries * classes) best (query, class) pairs, best first",
        "labels": "(batch, K) each pair's class index into class_names",
        "boxes": "(batch, K, 4) each pair's query's box, (x0, y0, x1, y1) in pixels of the model input",
    }

    def __init__(
        self,
        backbone: Joiner,
        encoder: HybridEncoder,
        decoder: RtDetrTransformer,
        num_classes: int,
        aux_loss: bool,
        dn_number: int,
        dn_label_noise_ratio: float,
        dn_box_noise_scale: float,
        num_select: int,
    ):
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes
        self.num_queries = decoder.num_queries
        self.aux_loss = aux_loss
        self.dn_number = dn_number
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        self.num_select = num_select

    def forward(
        self, samples: NestedTensor | Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Any]:
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features = self.backbone[0](samples)
        maps = self.encoder([feature.tensors for feature in features.values()])
        dn = self.denoising_queries(targets)
        dn_content = dn_box_logits = attn_mask = None
        if dn is not None:
            embed = self.decoder.denoising_class_embed
            dn_content = embed(torch.where(dn.valid, dn.labels, self.num_classes))
            padded_boxes = torch.where(dn.valid[..., None], dn.boxes, PADDING_BOX)
            dn_box_logits, attn_mask = inverse_sigmoid(padded_boxes), dn.attn_mask
        logits, boxes, proposal_logits, proposal_boxes = self.decoder(maps, dn_content, dn_box_logits, attn_mask)
        if not self.training:
            return {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        denoised = 0 if dn is None else dn.num_queries
        out = layer_outputs(logits[:, :, denoised:], boxes[:, :, denoised:], self.aux_loss)
        proposals = "enc_outputs" if self.decoder.query_select_method == "agnostic" else "interm_outputs"
        out[proposals] = {"pred_logits": proposal_logits, "pred_boxes": proposal_boxes}
        if dn is not None:
            out["dn_outputs"] = layer_outputs(logits[:, :, :denoised], boxes[:, :, :denoised], self.aux_loss)
            out["dn_meta"] = dn
        elif self.dn_number > 0:
            # keeps the denoising embedding in the graph when a batch has no objects (DDP expects every
            # parameter to get a gradient)
            out["pred_logits"] = out["pred_logits"] + self.decoder.denoising_class_embed.weight[0, 0] * 0.0
        return out

    def detections(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> Detections:
        """Scores (B, K), labels (B, K) and XYXY boxes (B, K, 4) in pixels of ``target_sizes`` (B, 2) as (h, w):
        the K = ``num_select`` best (query, class) pairs by sigmoid score (RT-DETR's postprocessor)."""
        return topk_detections(outputs, target_sizes, self.num_select)


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
    encoder = HybridEncoder(channels, hidden_dim, nheads, dim_feedforward, dropout, enc_layers, expansion, depth_mult)
    # NHWC convolutions: oneDNN takes them without reordering every map (RT-DETRv2-R18's encoder at 640x640 ran
    # in 71 ms instead of 99 on two CPU cores); the values are the same
    encoder.to(memory_format=torch.channels_last)
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
