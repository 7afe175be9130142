"""Running an exported detector file: ONNX through ONNX Runtime, a ``.pt2`` through ``torch.export.load``.

Either way: ``model(images, mask)`` returns the file's outputs as CPU tensors, and ``model.metadata``
is the dictionary the export wrote (class names, normalisation, resize, output meanings, the
checkpoint it came from). ``ExportedPredictor`` runs a file exported with ``postprocess=true`` the
way the ``Predictor`` runs a checkpoint, so that both are evaluated alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..image_input import InputConfig
from ..nested_tensor import NestedTensor
from .predictor import Detections, ranked_detections

METADATA_FILE = "metadata.json"  # inside a .pt2 archive
SUFFIX_FORMATS = {".onnx": "onnx", ".pt2": "torch_export"}


class OnnxRuntimeModel:
    def __init__(self, path: str | os.PathLike):
        import onnxruntime  # an optional dependency: pip install -e ".[export]"

        self.session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        properties = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, Any] = {key: json.loads(value) for key, value in properties.items()}
        self.input_names = [node.name for node in self.session.get_inputs()]

    def __call__(self, images: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        feed = dict(zip(self.input_names, (images.float().cpu().numpy(), mask.cpu().numpy())))
        return tuple(torch.from_numpy(output) for output in self.session.run(None, feed))


class TorchExportModel:
    def __init__(self, path: str | os.PathLike):
        extra = {METADATA_FILE: ""}
        self.program = torch.export.load(os.fspath(path), extra_files=extra)
        self.metadata: dict[str, Any] = json.loads(extra[METADATA_FILE] or "{}")
        self.module = self.program.module()

    def __call__(self, images: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        with torch.inference_mode():
            return tuple(self.module(images, mask))


def load_exported(path: str | os.PathLike, format: str | None = None) -> OnnxRuntimeModel | TorchExportModel:
    """The exported detector at ``path``; ``format`` (onnx | torch_export) defaults to the one its suffix names."""
    format = format or SUFFIX_FORMATS.get(Path(path).suffix)
    if format == "onnx":
        return OnnxRuntimeModel(path)
    if format == "torch_export":
        return TorchExportModel(path)
    raise ValueError(f"cannot tell the format of {os.fspath(path)}: name it .onnx or .pt2, or pass format=")


DETECTIONS = ("scores", "labels", "boxes")  # the post-processed outputs, in pixels of the unpadded model input


class ExportedPredictor:
    """``predict_batch`` of an exported file: its own post-processed detections, boxes scaled from the unpadded
    model input to each original image. Its classes and source are those its metadata records."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.model = load_exported(path)
        metadata = self.model.metadata
        outputs = list(metadata.get("outputs") or {})
        if not all(key in metadata for key in ("class_names", "category_ids")) or not outputs:
            raise ValueError(
                f"{self.path} holds no detector's metadata (class_names, category_ids, outputs): "
                "give a file written by python -m detr_backbone export"
            )
        if not set(DETECTIONS) <= set(outputs):
            raise ValueError(
                f"{self.path} has the outputs {', '.join(outputs)}, not a detector's detections ({', '.join(DETECTIONS)}): "
                "export it with postprocess=true to evaluate it"
            )
        self.output_names = outputs
        self.class_names: list[str] = list(metadata["class_names"])
        self.category_ids: list[int] = list(metadata["category_ids"])
        self.names_known = True
        self.source: dict[str, Any] = metadata.get("source") or {}
        # how the detector takes its images; files written before the record: DETR's
        self.input = InputConfig(**(metadata.get("input") or {}))

    def predict_batch(self, images: NestedTensor, original_sizes: Tensor) -> list[Detections]:
        outputs = dict(zip(self.output_names, self.model(images.tensors, images.mask)))
        valid = torch.stack([(~images.mask[:, :, 0]).sum(1), (~images.mask[:, 0, :]).sum(1)], 1)  # (h, w)
        scale = (original_sizes.float() / valid.float()).flip(1).repeat(1, 2)  # (w, h, w, h)
        boxes = outputs["boxes"].float() * scale[:, None, :]
        return ranked_detections(outputs["scores"], outputs["labels"], boxes, original_sizes, self.class_names)
