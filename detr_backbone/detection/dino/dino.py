"""The DINO detector: multi-scale Joiner features -> DINO's transformer -> sigmoid classes and boxes, with
contrastive denoising queries while training."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...joiner import Joiner
from ...nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from ..head import layer_outputs
from ..mlp import MLP
from ..multiscale.criterion import set_prior_bias
from ..multiscale.denoising import DenoisingHead
from ..multiscale.levels import check_levels, level_projections, linear_projection_parameters, project_levels
from ..multiscale.postprocess import topk_detections
from ..multiscale.refinement import inverse_sigmoid
from ..postprocess import Detections
from .transformer import LOGIT_EPS, DinoTransformer


class DINO(DenoisingHead, nn.Module):
    """Predicts ``num_queries`` (classes, box) pairs per image with one sigmoid score per class.

    ``forward(samples, targets=None)`` returns ``pred_logits`` (B, Q, num_classes), ``pred_boxes`` (B, Q, 4)
    normalised (cx, cy, w, h), ``aux_outputs`` (earlier decoder layers, with ``aux_loss``) and
    ``interm_outputs`` (the encoder's selected proposals). In training with targets and ``dn_number`` > 0,
    also ``dn_outputs`` (the same keys for the denoising queries) and ``dn_meta`` (their
    ``DenoisingQueries``); in evaluation, predict and export there are none.

    ``class_embed`` and ``bbox_embed`` hold one head per decoder layer, the same module repeated (DINO-4scale
    shares them); the proposals' heads ``transformer.enc_out_*`` are separate copies. ``label_enc`` embeds
    the denoising queries' classes (one row per class and one more, as DINO's ``dn_labelbook_size + 1``).
    """

    TRAINS_ON_TARGETS: ClassVar[bool] = True  # the training step passes the targets to forward
    OUTPUTS: ClassVar[Mapping[str, str]] = {
        "pred_logits": "(batch, queries, classes) sigmoid class logits, one per class, no 'no object' class",
        "pred_boxes": "(batch, queries, 4) boxes as (cx, cy, w, h) relative to each unpadded image",
        "scores": "(batch, K) sigmoid scores of the K = min(num_select, queries * classes) best (query, class) pairs, best first",
        "labels": "(batch, K) each pair's class index into class_names",
        "boxes": "(batch, K, 4) each pair's query's box, (x0, y0, x1, y1) in pixels of the unpadded model input",
    }

    def __init__(
        self,
        backbone: Joiner,
        transformer: DinoTransformer,
        num_classes: int,
        num_feature_levels: int,
        aux_loss: bool,
        dn_number: int,
        dn_label_noise_ratio: float,
        dn_box_noise_scale: float,
        num_select: int,
    ):
        super().__init__()
        hidden_dim = transformer.d_model
        backbone_channels = list(backbone[0].feature_channels)
        check_levels(hidden_dim, transformer.num_feature_levels, len(backbone_channels), num_feature_levels)
        self.num_queries = transformer.num_queries
        self.num_classes = num_classes
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.dn_number = dn_number
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        self.num_select = num_select
        # registered in DINO's order, so parameters (and optimizer states) come in its order
        self.transformer = transformer
        self.label_enc = nn.Embedding(num_classes + 1, hidden_dim)
        self.input_proj = level_projections(backbone_channels, hidden_dim, num_feature_levels)
        self.backbone = backbone
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        set_prior_bias(class_embed)
        # boxes start at their anchor
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        layers = transformer.decoder.num_layers
        self.bbox_embed = nn.ModuleList([bbox_embed] * layers)
        self.class_embed = nn.ModuleList([class_embed] * layers)
        transformer.decoder.bbox_embed = self.bbox_embed
        transformer.decoder.class_embed = self.class_embed
        transformer.enc_out_bbox_embed = copy.deepcopy(bbox_embed)
        transformer.enc_out_class_embed = copy.deepcopy(class_embed)

    def forward(
        self, samples: NestedTensor | Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Any]:
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, positions = self.backbone(samples)
        srcs, masks, positions = project_levels(self.input_proj, self.backbone, samples, features, positions)
        dn = self.denoising_queries(targets)
        dn_content = dn_box_logits = attn_mask = None
        if dn is not None:
            # padding slots have zero content and a box logit of 0
            dn_content = self.label_enc(dn.labels) * dn.valid[..., None]
            dn_box_logits = inverse_sigmoid(dn.boxes, LOGIT_EPS) * dn.valid[..., None]
            attn_mask = dn.attn_mask
        hs, anchor_logits, interm_class, interm_boxes = self.transformer(
            srcs, masks, positions, dn_content, dn_box_logits, attn_mask
        )
        if self.training:
            # keeps label_enc in the graph when a batch has no objects (DDP expects every parameter to get a gradient)
            hs = hs + self.label_enc.weight[0, 0] * 0.0
        # layer i's boxes move the anchor it was given (indexed one by one, as torch.export wants)
        logits = torch.stack([self.class_embed[layer](hs[layer]) for layer in range(len(hs))])
        boxes = torch.stack(
            [(self.bbox_embed[layer](hs[layer]) + anchor_logits[layer]).sigmoid() for layer in range(len(hs))]
        )
        denoised = 0 if dn is None else dn.num_queries
        out = layer_outputs(logits[:, :, denoised:], boxes[:, :, denoised:], self.aux_loss)
        out["interm_outputs"] = {"pred_logits": interm_class, "pred_boxes": interm_boxes}
        if dn is not None:
            out["dn_outputs"] = layer_outputs(logits[:, :, :denoised], boxes[:, :, :denoised], self.aux_loss)
            out["dn_meta"] = dn
        return out

    def detections(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> Detections:
        """Scores (B, K), labels (B, K) and XYXY boxes (B, K, 4) in pixels of ``target_sizes`` (B, 2) as (h, w):
        the K = ``num_select`` best (query, class) pairs by sigmoid score (DINO's PostProcess)."""
        return topk_detections(outputs, target_sizes, self.num_select)

    def linear_projection_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return linear_projection_parameters(self)


def build_dino(
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
    enc_n_points: int,
    dec_n_points: int,
    aux_loss: bool,
    dn_number: int,
    dn_label_noise_ratio: float,
    dn_box_noise_scale: float,
    num_select: int,
    attention_impl: str,
) -> DINO:
    """DINO on the Joiner ``backbone`` (its defaults: ``DinoConfig``); ``hidden_dim`` is the width of the Joiner's
    positional maps, which are added to the transformer's inputs."""
    transformer = DinoTransformer(
        d_model=hidden_dim,
        nhead=nheads,
        num_queries=num_queries,
        num_encoder_layers=enc_layers,
        num_decoder_layers=dec_layers,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        num_feature_levels=num_feature_levels,
        enc_n_points=enc_n_points,
        dec_n_points=dec_n_points,
        attention_impl=attention_impl,
    )
    return DINO(
        backbone,
        transformer,
        num_classes,
        num_feature_levels,
        aux_loss,
        dn_number,
        dn_label_noise_ratio,
        dn_box_noise_scale,
        num_select,
    )
