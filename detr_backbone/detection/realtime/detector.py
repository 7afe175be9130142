"""What the real-time detectors share around their decoders: the Joiner's body -> the hybrid encoder, the
denoising queries' inputs, RT-DETR's top-k post-processing. Their attributes are RT-DETR's (``backbone``,
``encoder``, ``decoder``), so published checkpoints load once the backbone's names are mapped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ...joiner import Joiner
from ...nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from ..multiscale.denoising import DenoisingHead, DenoisingQueries
from ..multiscale.postprocess import topk_detections
from ..multiscale.refinement import inverse_sigmoid
from ..postprocess import Detections
from .hybrid_encoder import HybridEncoder

PADDING_BOX = 0.0  # RT-DETR's padding slots hold an all-zero box (its logit clamped to log(1e-5))


class DenoisingInputs(NamedTuple):
    """The denoising queries (``queries``), their content (B, D, C) and box logits (B, D, 4), and the attention
    mask (D + Q, D + Q) that keeps the groups apart; all None without denoising."""

    queries: DenoisingQueries | None = None
    content: Tensor | None = None
    box_logits: Tensor | None = None
    attn_mask: Tensor | None = None


class RealTimeDetector(DenoisingHead, nn.Module):
    """Predicts ``num_queries`` (classes, box) pairs per image with one sigmoid score per class.

    A subclass's ``forward(samples, targets=None)`` returns ``pred_logits`` (B, Q, num_classes) and ``pred_boxes``
    (B, Q, 4) normalised (cx, cy, w, h): in evaluation the ``eval_idx`` decoder layer's; in training what its
    criterion needs. No padding mask: images of a batch share one size (the input record resizes every image
    to a square). The Joiner's positional maps are not used: the encoder encodes positions on the one level it
    attends over.
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
        decoder: nn.Module,
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

    def fused_maps(self, samples: NestedTensor | Sequence[Tensor]) -> list[Tensor]:
        """The hybrid encoder's maps (B, hidden_dim, h_i, w_i) of a batch, shallow to deep."""
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features = self.backbone[0](samples)
        return self.encoder([feature.tensors for feature in features.values()])

    def denoising_inputs(self, targets: Sequence[Mapping[str, Tensor]] | None) -> DenoisingInputs:
        """The denoising queries of a training batch with targets, as the decoder takes them."""
        dn = self.denoising_queries(targets)
        if dn is None:
            return DenoisingInputs()
        content = self.decoder.denoising_class_embed(torch.where(dn.valid, dn.labels, self.num_classes))
        padded_boxes = torch.where(dn.valid[..., None], dn.boxes, PADDING_BOX)
        return DenoisingInputs(dn, content, inverse_sigmoid(padded_boxes), dn.attn_mask)

    def with_denoising_table(self, out: dict[str, Any]) -> dict[str, Any]:
        """``out`` with the denoising embedding kept in the graph, for a batch without objects (DDP expects every
        parameter to get a gradient)."""
        if self.dn_number > 0:
            out["pred_logits"] = out["pred_logits"] + self.decoder.denoising_class_embed.weight[0, 0] * 0.0
        return out

    def proposal_key(self) -> str:
        """Where the selected proposals go in the training outputs: one objectness logit each is ``enc_outputs``."""
        return "enc_outputs" if self.decoder.query_select_method == "agnostic" else "interm_outputs"

    def detections(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> Detections:
        """Scores (B, K), labels (B, K) and XYXY boxes (B, K, 4) in pixels of ``target_sizes`` (B, 2) as (h, w):
        the K = ``num_select`` best (query, class) pairs by sigmoid score (RT-DETR's postprocessor)."""
        return topk_detections(outputs, target_sizes, self.num_select)
