"""Export a detector for ONNX Runtime (``format=onnx``) or as a ``torch.export`` program (``format=torch_export``).

    python -m detr_backbone export ckpt_path=outputs/<run>/checkpoints/last.ckpt            # -> last.onnx beside it
    python -m detr_backbone export ckpt_path=detr-r50-e632da11.pth format=torch_export output=detr.pt2

Inputs ``images`` (batch, 3, height, width) and ``mask`` (batch, height, width), batch, height and
width dynamic; outputs ``pred_logits`` and ``pred_boxes`` (with ``postprocess=true`` also scores,
labels and pixel boxes). The written file is run on a batch of another size than the traced one and
compared with eager PyTorch; above the tolerance the file is removed and the command fails.
Keys: conf/export.yaml, as Hydra overrides.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..inference.checkpoint import load_detector
from ..inference.export import FORMATS, ExportCheckError, ExportReport, Tolerance, export_detector
from ..validation import require
from .cli import compose_command, reported


@dataclass
class ExportConfig:
    ckpt_path: Optional[str] = None  # a train.py checkpoint or any head's published file or folder
    dilation: Optional[bool] = None  # DETR's own checkpoints do not record it: true for their DC5 files
    allowed_targets: list[str] = field(default_factory=list)  # your own _target_ paths a checkpoint may build
    format: str = "onnx"  # onnx | torch_export
    output: Optional[str] = None  # null: the checkpoint's path with the format's suffix
    postprocess: bool = False
    trace_size: list[int] = field(default_factory=lambda: [384, 512])
    check_size: list[int] = field(default_factory=lambda: [352, 448])
    atol: float = Tolerance.atol
    rtol: float = Tolerance.rtol

    def __post_init__(self) -> None:
        usage = "python -m detr_backbone export ckpt_path=<checkpoint> format=onnx"
        require(self.ckpt_path is not None, f"ckpt_path is required: {usage}")
        require(self.format in FORMATS, f"format={self.format!r} is not supported; choose one of {', '.join(FORMATS)}")
        for name in ("trace_size", "check_size"):
            size = getattr(self, name)
            require(len(size) == 2 and min(size) >= 64, f"{name}={list(size)} must be [height, width], both >= 64")
        require(
            list(self.check_size) != list(self.trace_size),
            f"check_size={list(self.check_size)} must differ from trace_size",
        )
        require(self.atol >= 0 and self.rtol >= 0, f"atol={self.atol} and rtol={self.rtol} must be >= 0")


def output_path(cfg: ExportConfig) -> Path:
    """``output``, or the checkpoint's path with the format's suffix (``model<suffix>`` inside a folder)."""
    suffix = FORMATS[cfg.format]
    if cfg.output is not None:
        path = Path(cfg.output)
        require(
            not path.is_dir(),
            f"output={cfg.output!r} is a folder; give the file to write, e.g. {path / ('model' + suffix)}",
        )
        return path
    source = Path(cfg.ckpt_path)
    return source / f"model{suffix}" if source.is_dir() else source.with_suffix(suffix)


def export(cfg: ExportConfig) -> ExportReport:
    path = output_path(cfg)
    loaded = load_detector(cfg.ckpt_path, cfg.dilation, cfg.allowed_targets)
    return export_detector(
        loaded,
        cfg.format,
        path,
        postprocess=cfg.postprocess,
        trace_size=tuple(cfg.trace_size),
        check_size=tuple(cfg.check_size),
        tolerance=Tolerance(cfg.atol, cfg.rtol),
    )


def main(argv: Sequence[str] | None = None) -> ExportReport:
    with reported(ExportCheckError):
        cfg = compose_command("export", ExportConfig, argv or [], __doc__)
        result = export(cfg)
    print(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
