"""A detector exported to run without this package: ONNX, or a ``torch.export`` program (``.pt2``).

Both come from one ``torch.export`` trace of ``(images, mask) -> (pred_logits, pred_boxes)`` with batch,
height and width dynamic; the ONNX file is translated from that program by ``torch.onnx.export(dynamo=True)``.
(With torch 2.14 the legacy TorchScript exporter also keeps height and width dynamic for this model,
but it traces the model a second time and is deprecated.) The class names, the normalisation and
the resize (the detector's input record) go into the file's metadata. Before a file is kept, it is run (ONNX Runtime for ONNX)
on a batch of another size than the traced one and compared with eager PyTorch: every output
element must be within ``atol + rtol * |eager|`` (``Tolerance``), or the file is removed and
``ExportCheckError`` says by how much it missed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from ..data.transforms import pixel_statistics
from ..detection import Detector
from ..file_writes import atomic_write
from ..image_input import InputConfig
from ..nested_tensor import NestedTensor
from .checkpoint import LoadedDetector
from .exported import METADATA_FILE, load_exported

FORMATS = {"onnx": ".onnx", "torch_export": ".pt2"}
FORMAT_NAMES = {"onnx": "ONNX", "torch_export": "torch.export program"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the exporter's, and the runtime of the check
INPUT_NAMES = ("images", "mask")
RAW_OUTPUTS = ("pred_logits", "pred_boxes")
POSTPROCESSED_OUTPUTS = ("scores", "labels", "boxes")
TRACE_BATCH, CHECK_BATCH = 2, 3  # the check also runs another batch size than the trace's
PADDING = (16, 24)  # rows and columns of padding in the last image of example batches, so the mask matters


class ExportCheckError(RuntimeError):
    """The exported file's outputs differ from eager PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class Tolerance:
    """``|exported - eager| <= atol + rtol * |eager|`` for every element of every output.

    Float32 kernels of ONNX Runtime and PyTorch sum in other orders: on DETR-R50 (hidden 256, one
    800 x 1066 image, python -m benchmarks.inference) the ONNX outputs differed from eager by at most
    3.7e-6 (logits) and 1.5e-7 (normalised boxes), the torch.export program's by 0. The bounds leave
    a margin of 25 and more, yet a wrong graph fails: ignoring the padding mask moves the test
    suite's small model's logits by 0.07 and its boxes by 0.003, several times the bound.
    Pixel boxes are compared divided by the image's longer side.
    """

    atol: float = 1e-4
    rtol: float = 1e-3


class ExportableDetector(nn.Module):
    """``(images (B, 3, H, W) normalised, mask (B, H, W) True on padding)`` -> ``pred_logits`` and
    ``pred_boxes`` (B, Q, 4) as (cx, cy, w, h) relative to each unpadded image; with ``postprocess`` also
    the head's own detections: ``scores``, ``labels`` and ``boxes`` as (x0, y0, x1, y1) in pixels of the
    unpadded image (multiply by original / model-input size for the original image's pixels). The
    detector's ``OUTPUTS`` says what each is for its head; the exported metadata repeats it."""

    def __init__(self, detector: Detector, postprocess: bool = False):
        super().__init__()
        self.detector = detector
        self.postprocess = postprocess

    @property
    def output_names(self) -> tuple[str, ...]:
        return RAW_OUTPUTS + (POSTPROCESSED_OUTPUTS if self.postprocess else ())

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        outputs = self.detector(NestedTensor(images, mask))
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if not self.postprocess:
            return logits, boxes
        # padding is at the bottom and the right: the first column counts the valid rows, the first row the columns
        sizes = torch.stack([(~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)], dim=1)
        return (logits, boxes, *self.detector.detections(outputs, sizes))


def example_batch(batch: int, height: int, width: int, seed: int = 0, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Random images as the detector takes them (ImageNet-normalised with ``normalize``: about N(0, 1); else
    pixels / 255 in [0, 1]) and their mask; the last image is padded at its bottom and right."""
    generator = torch.Generator().manual_seed(seed)
    draw = torch.randn if normalize else torch.rand
    images = draw(batch, 3, height, width, generator=generator)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    mask[-1, height - min(PADDING[0], height // 4) :, :] = True
    mask[-1, :, width - min(PADDING[1], width // 4) :] = True
    images[mask[:, None].expand_as(images)] = 0.0
    return images, mask


def trace(model: ExportableDetector, height: int, width: int, normalize: bool = True) -> ExportedProgram:
    """The ``torch.export`` program of ``model`` with batch, height and width dynamic.

    Height and width are left for the tracer to bound (``Dim.DYNAMIC``): a ResNet needs at least 33
    pixels for its stride-32 map to stay wider than one cell, and the learned encoding caps them.
    """
    batch = Dim("batch", min=1)
    spatial = {2: Dim.DYNAMIC, 3: Dim.DYNAMIC}
    dynamic = {"images": {0: batch, **spatial}, "mask": {0: batch, 1: spatial[2], 2: spatial[3]}}
    with torch.no_grad():
        example = example_batch(TRACE_BATCH, height, width, normalize=normalize)
        return torch.export.export(model.eval(), example, dynamic_shapes=dynamic)


def dynamic_ranges(program: ExportedProgram) -> dict[str, list[int | None]]:
    """The [min, max] of batch, height and width the program accepts (None: unbounded)."""
    images = next(node for node in program.graph.nodes if node.op == "placeholder" and node.name == "images")
    ranges = {}
    for axis, index in (("batch", 0), ("height", 2), ("width", 3)):
        size = images.meta["val"].shape[index]
        bounds = program.range_constraints.get(size.node.expr) if isinstance(size, torch.SymInt) else None
        upper = int(bounds.upper) if bounds is not None and bounds.upper.is_Integer else None  # else torch's int_oo
        ranges[axis] = [int(size), int(size)] if bounds is None else [int(bounds.lower), upper]
    return ranges


def export_metadata(
    loaded: LoadedDetector, model: ExportableDetector, ranges: dict[str, list[int | None]]
) -> dict[str, Any]:
    """What a user of the file needs beside the graph: classes, input preparation, output meanings."""
    outputs = {name: loaded.detector.OUTPUTS[name] for name in model.output_names}  # in the head's own words
    record = loaded.input
    mean, std = pixel_statistics(record.normalize)
    normalised = "pixels / 255, minus mean, divided by std" if record.normalize else "pixels / 255, not normalised"
    if record.resize == "square":
        resize = {"square": loaded.size}
    else:
        resize = {"shorter_side": loaded.size, "max_size": loaded.max_size}
    return {
        "class_names": loaded.class_names,
        "category_ids": loaded.category_ids,
        "inputs": {
            "images": f"(batch, 3, height, width) float32 RGB: {normalised}; padded at bottom/right",
            "mask": "(batch, height, width) bool, True on padding",
        },
        "outputs": outputs,
        "input": asdict(record),  # the detector's input record (model.input)
        "normalization": {"pixel_scale": 1 / 255, "mean": list(mean), "std": list(std)},
        "resize": resize,
        "dynamic_shapes": ranges,
        "source": {"path": os.path.abspath(loaded.path), "kind": loaded.source},
        "torch": torch.__version__,
    }


def onnx_bytes(program: ExportedProgram, model: ExportableDetector, metadata: dict[str, Any]) -> bytes:
    # the optimizer warns about every multi-output op it leaves unfolded (a Split in each attention): noise here
    optimizer_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = optimizer_log.level
    optimizer_log.setLevel(logging.ERROR)
    try:
        onnx_program = torch.onnx.export(
            program, dynamo=True, input_names=INPUT_NAMES, output_names=model.output_names, verbose=False
        )
    finally:
        optimizer_log.setLevel(level)
    images = onnx_program.model.graph.inputs[0].shape
    onnx_program.rename_axes({str(images[0]): "batch", str(images[2]): "height", str(images[3]): "width"})
    onnx_program.model.metadata_props.update({key: json.dumps(value) for key, value in metadata.items()})
    return onnx_program.model_proto.SerializeToString()


def torch_export_bytes(program: ExportedProgram, model: ExportableDetector, metadata: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


SERIALIZERS: dict[str, Callable[[ExportedProgram, ExportableDetector, dict[str, Any]], bytes]] = {
    "onnx": onnx_bytes,
    "torch_export": torch_export_bytes,
}


def check_exported(
    path: Path,
    format: str,
    model: ExportableDetector,
    height: int,
    width: int,
    tolerance: Tolerance,
    input: InputConfig | None = None,
) -> dict[str, float]:
    """Runs the written file on a (CHECK_BATCH, 3, height, width) batch of images prepared as ``input`` says
    (None: DETR's) and compares it with eager PyTorch.

    Returns the largest |difference| per output; raises ExportCheckError above the tolerance.
    """
    normalize = (input or InputConfig()).normalize
    images, mask = example_batch(CHECK_BATCH, height, width, seed=1, normalize=normalize)
    with torch.inference_mode():
        expected = model(images, mask)
    got = load_exported(path, format)(images, mask)
    diffs, failed = {}, []
    for name, want, have in zip(model.output_names, expected, got):
        if name == "labels":  # the argmax of the checked logits: two near-equal classes may swap
            continue
        scale = max(height, width) if name == "boxes" else 1
        want, have = want.double() / scale, have.double() / scale
        difference = (have - want).abs()
        diffs[name] = float(difference.max())
        if (difference > tolerance.atol + tolerance.rtol * want.abs()).any():
            failed.append(name)
    if failed:
        details = ", ".join(f"{name} max |diff| {diffs[name]:.3g}" for name in failed)
        raise ExportCheckError(
            f"{path.name} differs from eager PyTorch on a {CHECK_BATCH}x3x{height}x{width} batch beyond "
            f"|diff| <= {tolerance.atol:g} + {tolerance.rtol:g} * |eager|: {details}; the file was removed"
        )
    return diffs


@dataclass
class ExportReport:
    path: Path
    format: str
    size_bytes: int
    traced_size: tuple[int, int]
    checked_size: tuple[int, int]
    max_abs_diff: dict[str, float]
    tolerance: Tolerance
    dynamic_shapes: dict[str, list[int | None]]
    seconds: float

    def __str__(self) -> str:
        ranges = ", ".join(
            f"{axis} {low}..{'' if high is None else high}" for axis, (low, high) in self.dynamic_shapes.items()
        )
        checker = "ONNX Runtime" if self.format == "onnx" else "torch.export.load"
        diffs = ", ".join(f"{name} {value:.1e}" for name, value in self.max_abs_diff.items())
        return "\n".join(
            [
                f"wrote {self.path} ({FORMAT_NAMES[self.format]}, {self.size_bytes / 1e6:.1f} MB) in {self.seconds:.0f} s",
                f"inputs: images (batch, 3, height, width), mask (batch, height, width); dynamic: {ranges}",
                f"checked with {checker} on {CHECK_BATCH}x3x{self.checked_size[0]}x{self.checked_size[1]} "
                f"(traced at {TRACE_BATCH}x3x{self.traced_size[0]}x{self.traced_size[1]}): max |diff| {diffs} "
                f"(allowed {self.tolerance.atol:g} + {self.tolerance.rtol:g} * |eager|)",
            ]
        )


@dataclass
class Traced:
    """One trace of a detector, from which any format is written."""

    model: ExportableDetector  # the eager module traced, the reference of every check
    program: ExportedProgram
    size: tuple[int, int]  # (height, width) of the example batch
    metadata: dict[str, Any]
    seconds: float
    input: InputConfig  # how the detector takes its images: the trace's and the check's example batches


def traced_detector(
    loaded: LoadedDetector, postprocess: bool = False, trace_size: tuple[int, int] = (384, 512)
) -> Traced:
    """``loaded``'s detector traced by ``torch.export`` in float32 on the CPU, batch, height and width dynamic."""
    start = time.perf_counter()
    model = ExportableDetector(loaded.detector.float().cpu(), postprocess).eval()
    program = trace(model, *trace_size, normalize=loaded.input.normalize)
    metadata = export_metadata(loaded, model, dynamic_ranges(program))
    return Traced(model, program, tuple(trace_size), metadata, time.perf_counter() - start, loaded.input)


def write_exported(
    traced: Traced,
    format: str,
    path: str | os.PathLike,
    check_size: tuple[int, int] = (352, 448),
    tolerance: Tolerance = Tolerance(),
) -> ExportReport:
    """Writes ``traced`` as ``format`` to ``path`` (atomically), then checks the written file against the
    traced eager module on a batch of ``check_size``; a file that fails its check is removed."""
    check_requirements(format)
    if tuple(check_size) == traced.size:
        raise ValueError(
            f"check_size={list(check_size)} must differ from the traced size: the check is of another size"
        )
    start = time.perf_counter()
    content = SERIALIZERS[format](traced.program, traced.model, traced.metadata)
    target = atomic_write(path, lambda stream: stream.write(content))
    try:
        diffs = check_exported(target, format, traced.model, *check_size, tolerance, traced.input)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    seconds = traced.seconds + time.perf_counter() - start
    ranges = traced.metadata["dynamic_shapes"]
    return ExportReport(target, format, len(content), traced.size, tuple(check_size), diffs, tolerance, ranges, seconds)


def check_requirements(format: str) -> None:
    """A missing exporter or runtime named before any work, with the install command."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {', '.join(FORMATS)}")
    missing = [name for name in ONNX_PACKAGES if format == "onnx" and importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"format=onnx needs {', '.join(missing)}: pip install -e '.[export]'")


def export_detector(
    loaded: LoadedDetector,
    format: str,
    path: str | os.PathLike,
    *,
    postprocess: bool = False,
    trace_size: tuple[int, int] = (384, 512),
    check_size: tuple[int, int] = (352, 448),
    tolerance: Tolerance = Tolerance(),
) -> ExportReport:
    """Traces ``loaded``'s detector and writes it as ``format`` to ``path``, checked (``write_exported``)."""
    check_requirements(format)  # before the trace, which takes a while
    return write_exported(traced_detector(loaded, postprocess, trace_size), format, path, check_size, tolerance)
