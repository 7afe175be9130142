"""Running an exported detector file: ONNX through ONNX Runtime, a ``.pt2`` through ``torch.export.load``.

Either way: ``model(images, mask)`` returns the file's outputs as CPU tensors, and ``model.metadata``
is the dictionary the export wrote (class names, normalisation, resize, output meanings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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
