"""The Deformable DETR detector: multi-scale Joiner features -> deformable transformer -> sigmoid classes and boxes."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from ...joiner import Joiner
from ...nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from ..head import layer_outputs
from ..mlp import MLP
from ..multiscale.criterion import set_prior_bias
from ..multiscale.levels import check_levels, level_projections, linear_projection_parameters, project_levels
from ..multiscale.postprocess import topk_detections
from ..multiscale.refinement import offset_reference
from ..postprocess import Detections
from .transformer import DeformableTransformer


class DeformableDETR(nn.Module):
    """Predicts ``num_queries`` (classes, box) pairs per image, with one sigmoid score per class and no
    "no object" class (trained with a focal loss).

    ``forward`` takes a NestedTensor or a list of (3, H, W) images and returns ``pred_logits``
    (B, Q, num_classes), ``pred_boxes`` (B, Q, 4) as normalised (cx, cy, w, h), with ``aux_loss`` the
    same pair for every earlier decoder layer in ``aux_outputs``, and with ``two_stage`` the
    encoder's proposals (B, S, num_classes) and (B, S, 4) in ``enc_outputs``.

    Levels: one 1x1 projection per Joiner level, then 3x3 stride-2 projections up to
    ``num_feature_levels`` (the first reads the deepest backbone map, the next the previous extra
    level). ``class_embed`` and ``bbox_embed`` hold one head per decoder layer (+1 for the
    proposals with ``two_stage``): the same module repeated, or separate copies with
    ``with_box_refine``, which the decoder also uses to refine its reference boxes.
    """

    TRAINS_ON_TARGETS: ClassVar[bool] = False
    OUTPUTS: ClassVar[Mapping[str, str]] = {
        "pred_logits": "(batch, queries, classes) sigmoid class logits, one per class, no 'no object' class",
        "pred_boxes": "(batch, queries, 4) boxes as (cx, cy, w, h) relative to each unpadded image",
        "scores": "(batch, K) sigmoid scores of the K = min(100, queries * classes) best (query, class) pairs, best first",
        "labels": "(batch, K) each pair's class index into class_names",
        "boxes": "(batch, K, 4) each pair's query's box, (x0, y0, x1, y1) in pixels of the unpadded model input",
    }

    def __init__(
        self,
        backbone: Joiner,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int,
        num_feature_levels: int,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        two_stage: bool = False,
    ):
        super().__init__()
        hidden_dim = transformer.d_model
        backbone_channels = list(backbone[0].feature_channels)
        self.check_options(
            transformer, len(backbone_channels), num_queries, num_feature_levels, aux_loss, with_box_refine, two_stage
        )
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.transformer = transformer
        # registered before the other heads, as in Deformable-DETR, so parameters come in its order
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.input_proj = level_projections(backbone_channels, hidden_dim, num_feature_levels)
        self.backbone = backbone
        self.make_heads(transformer.decoder.num_layers + (1 if two_stage else 0))

    def make_heads(self, num_pred: int) -> None:
        """One class and one box head per prediction (decoder layers, + the proposals with two-stage),
        initialised as Deformable-DETR's; shared without refinement, copies with it."""
        class_embed, bbox_embed, decoder = self.class_embed, self.bbox_embed, self.transformer.decoder
        set_prior_bias(class_embed)
        # boxes start at their reference: no move, and a small size (sigmoid(-2) = 0.12) where the reference is a point
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
        if self.with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            for later in self.bbox_embed[1:]:  # later layers refine a box that already has a size
                nn.init.constant_(later.layers[-1].bias[2:], 0.0)
            decoder.bbox_embed = self.bbox_embed
        else:
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if self.two_stage:
            decoder.class_embed = self.class_embed
            for head in self.bbox_embed:  # proposals already have a size
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)

    @staticmethod
    def check_options(
        transformer: DeformableTransformer,
        backbone_levels: int,
        num_queries: int,
        num_feature_levels: int,
        aux_loss: bool,
        with_box_refine: bool,
        two_stage: bool,
    ) -> None:
        check_levels(transformer.d_model, transformer.num_feature_levels, backbone_levels, num_feature_levels)
        if aux_loss and not transformer.decoder.return_intermediate:
            raise ValueError(
                "aux_loss=True needs every decoder layer: build the transformer with return_intermediate_dec=True"
            )
        if two_stage != transformer.two_stage:
            raise ValueError(
                f"two_stage={two_stage} but the transformer was built with two_stage={transformer.two_stage}"
            )
        if two_stage and not with_box_refine:
            raise ValueError(
                "two_stage=True needs with_box_refine=True (as Deformable-DETR's published two-stage models)"
            )
        if two_stage and num_queries != transformer.two_stage_num_proposals:
            raise ValueError(
                f"two-stage queries are the transformer's {transformer.two_stage_num_proposals} proposals, "
                f"but num_queries={num_queries}: build the transformer with two_stage_num_proposals=num_queries"
            )

    def forward(self, samples: NestedTensor | Sequence[Tensor]) -> dict:
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, positions = self.backbone(samples)
        srcs, masks, positions = self.project_levels(samples, features, positions)
        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_class, enc_coord = self.transformer(
            srcs, masks, positions, query_embed
        )
        logits = torch.stack([self.class_embed[layer](hs[layer]) for layer in range(len(hs))])
        if self.with_box_refine:  # the decoder's refined boxes are the detector's
            boxes = inter_references
        else:
            # layer i predicts relative to the reference it was given: the initial one, then each layer's
            # (indexed one by one: unbinding an empty slice, with one decoder layer, breaks torch.export's files)
            references = [init_reference] + [inter_references[layer] for layer in range(len(hs) - 1)]
            boxes = torch.stack(
                [
                    offset_reference(self.bbox_embed[layer](hs[layer]), references[layer]).sigmoid()
                    for layer in range(len(hs))
                ]
            )
        out = layer_outputs(logits, boxes, self.aux_loss)
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord.sigmoid()}
        return out

    def project_levels(
        self, samples: NestedTensor, features: list[NestedTensor], positions: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        return project_levels(self.input_proj, self.backbone, samples, features, positions)

    def detections(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> Detections:
        """Scores (B, K), labels (B, K) and XYXY boxes (B, K, 4) in pixels of ``target_sizes`` (B, 2) as (h, w):
        the K = 100 best (query, class) pairs by sigmoid score (Deformable-DETR's PostProcess)."""
        return topk_detections(outputs, target_sizes)

    def linear_projection_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """See ``linear_projection_parameters``."""
        return linear_projection_parameters(self)


def build_deformable_detr(
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
    with_box_refine: bool,
    two_stage: bool,
    attention_impl: str,
) -> DeformableDETR:
    """Deformable DETR on the Joiner ``backbone`` (its defaults: ``DeformableDetrConfig``); ``hidden_dim`` is the width
    of the Joiner's positional maps, which are added to the transformer's inputs."""
    transformer = DeformableTransformer(
        d_model=hidden_dim,
        nhead=nheads,
        num_encoder_layers=enc_layers,
        num_decoder_layers=dec_layers,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        return_intermediate_dec=True,
        num_feature_levels=num_feature_levels,
        dec_n_points=dec_n_points,
        enc_n_points=enc_n_points,
        two_stage=two_stage,
        two_stage_num_proposals=num_queries,
        attention_impl=attention_impl,
    )
    return DeformableDETR(
        backbone, transformer, num_classes, num_queries, num_feature_levels, aux_loss, with_box_refine, two_stage
    )
