"""The DETR detector: Joiner features -> transformer -> a class and a box for each object query."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from torch import Tensor, nn

from ...joiner import Joiner
from ...nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from ..head import layer_outputs
from ..mlp import MLP
from ..postprocess import Detections
from .postprocess import softmax_detections
from .transformer import Transformer, build_transformer


class DETR(nn.Module):
    """Predicts ``num_queries`` (class, box) pairs per image; class ``num_classes`` means "no object".

    ``forward`` takes a NestedTensor or a list of (3, H, W) images and returns ``pred_logits``
    (B, Q, num_classes + 1), ``pred_boxes`` (B, Q, 4) as normalised (cx, cy, w, h), and with
    ``aux_loss`` the same pair for every earlier decoder layer in ``aux_outputs``.
    """

    TRAINS_ON_TARGETS: ClassVar[bool] = False
    OUTPUTS: ClassVar[Mapping[str, str]] = {
        "pred_logits": "(batch, queries, classes + 1) class logits; the last class is 'no object'",
        "pred_boxes": "(batch, queries, 4) boxes as (cx, cy, w, h) relative to each unpadded image",
        "scores": "(batch, queries) each query's best real class probability (softmax)",
        "labels": "(batch, queries) that class's index into class_names",
        "boxes": "(batch, queries, 4) (x0, y0, x1, y1) in pixels of the unpadded model input",
    }

    def __init__(
        self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int, aux_loss: bool = True
    ):
        super().__init__()
        if aux_loss and not transformer.decoder.return_intermediate:
            raise ValueError(
                "aux_loss=True needs every decoder layer: build the transformer with return_intermediate_dec=True"
            )
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.aux_loss = aux_loss
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.feature_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone

    def forward(self, samples: NestedTensor | Sequence[Tensor]) -> dict:
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, positions = self.backbone(samples)
        src, mask = features[-1].decompose()
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, positions[-1])[0]
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        return layer_outputs(logits, boxes, self.aux_loss)

    def detections(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> Detections:
        """Scores (B, Q), labels (B, Q) and XYXY boxes (B, Q, 4) in pixels of ``target_sizes`` (B, 2) as (h, w):
        every query with its best real class (``softmax_detections``)."""
        return softmax_detections(outputs, target_sizes)


def build_detr(
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
    pre_norm: bool,
    aux_loss: bool,
) -> DETR:
    """DETR around ``backbone`` (the ``_target_`` of conf/model/detr.yaml; its defaults: ``DetrConfig``)."""
    transformer = build_transformer(
        d_model=hidden_dim,
        nhead=nheads,
        num_encoder_layers=enc_layers,
        num_decoder_layers=dec_layers,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        normalize_before=pre_norm,
        return_intermediate_dec=True,
    )
    return DETR(backbone, transformer, num_classes, num_queries, aux_loss=aux_loss)
