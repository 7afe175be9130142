"""Detect objects in images: one drawn image per input and ``detections.json`` in COCO's results format.

    python -m detr_backbone predict ckpt_path=outputs/<run>/checkpoints/last.ckpt input=photos/
    python -m detr_backbone predict ckpt_path=detr-r50-e632da11.pth input='photos/*.jpg' threshold=0.7 output_dir=out

``input`` is an image file, a folder (its image files, not its subfolders) or a glob. Each drawn
image keeps its path below the inputs' common folder, under ``output_dir``. Keys and defaults:
conf/predict.yaml; they are Hydra overrides, as for train.py.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from PIL import Image
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from ..data.coco import load_coco
from ..data.images import load_rgb_image, open_image, upright_size
from ..data.visualize import PREDICTION_COLOR, draw_boxes
from ..file_writes import atomic_write
from ..inference.coco_files import category_ids_by_name, detection_rows, write_json
from ..inference.image_files import common_root, find_images
from ..inference.predictor import DTYPES, Detections, Predictor, size_groups
from ..validation import require
from .cli import compose_command, reported

ON_ERROR = ("skip", "stop")
DETECTIONS_FILE = "detections.json"


@dataclass
class PredictConfig:
    ckpt_path: Optional[str] = None  # a train.py checkpoint or any head's published file or folder
    dilation: Optional[bool] = None  # DETR's own checkpoints do not record it: true for their DC5 files
    allowed_targets: list[str] = field(default_factory=list)  # your own _target_ paths a checkpoint may build
    input: Optional[str] = None  # an image, a folder or a glob
    output_dir: str = "predictions"
    threshold: float = 0.5  # detections scoring below are dropped
    top_k: Optional[int] = None  # at most this many per image, best first; null: all above the threshold
    # the evaluation side: the shorter side, or the square's side for a detector whose model.input.resize is square;
    # null: the checkpoint's evaluation size; 0: none
    size: Optional[int] = None
    max_size: int = 1333  # longest side after resizing
    batch_size: int = 4
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    compile: bool = False  # torch.compile the detector (pays off on large folders of few image sizes)
    # oneDNN-fused frozen-BN ResNet convolutions; null: on a CPU in float32/bfloat16, uncompiled
    fuse: Optional[bool] = None
    on_error: str = "skip"  # an unreadable image: skip (named, counted) | stop (the run fails, naming it)
    annotations: Optional[str] = None  # a COCO instances file: image_id by file name, category_id by class name
    draw: bool = True  # write the drawn images (detections.json is always written)
    progress: bool = True

    def __post_init__(self) -> None:
        usage = "python -m detr_backbone predict ckpt_path=<checkpoint> input=<image | folder | glob>"
        require(self.ckpt_path is not None, f"ckpt_path is required: {usage}")
        require(self.input is not None, f"input is required: {usage}")
        require(0 <= self.threshold <= 1, f"threshold={self.threshold} must be in [0, 1]")
        require(self.top_k is None or self.top_k >= 1, f"top_k={self.top_k} must be >= 1 or null")
        require(self.size is None or self.size >= 0, f"size={self.size} must be >= 0 (0: no resize) or null")
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        require(self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        require(
            not (self.fuse and self.compile), "fuse=true and compile=true exclude each other: inductor fuses on its own"
        )
        require(self.on_error in ON_ERROR, f"on_error={self.on_error!r} is not one of {', '.join(ON_ERROR)}")


@dataclass
class PredictSummary:
    images: int  # predicted
    detections: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    written: list[Path] = field(default_factory=list)  # detections.json, then the drawn images


def predictor_options(cfg: PredictConfig) -> dict[str, Any]:
    options = dict(threshold=cfg.threshold, top_k=cfg.top_k, batch_size=cfg.batch_size, max_size=cfg.max_size)
    options.update(device=cfg.device, dtype=cfg.dtype, compile=cfg.compile, fuse=cfg.fuse)
    if cfg.size is not None:  # otherwise the checkpoint's own evaluation size
        options["size"] = cfg.size or None
    return options


def drawn(image: Image.Image, detections: Detections) -> Image.Image:
    """The image with each detection's box and "name score" caption."""
    captions = [f"{name} {score:.2f}" for name, score in zip(detections.names, detections.scores.tolist())]
    line = max(2, round(max(image.size) / 400))
    return TF.to_pil_image(draw_boxes(TF.pil_to_tensor(image), detections.boxes, captions, PREDICTION_COLOR, line))


def save_image(image: Image.Image, path: Path) -> Path:
    """Written whole or not at all, in the format its suffix names."""
    kind = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    return atomic_write(path, lambda stream: image.save(stream, format=kind))


def annotation_ids(cfg: PredictConfig, class_names: Sequence[str]) -> tuple[dict[str, int], list[int] | None]:
    """From ``annotations``: image ids by file name, and the dataset id of each class (None without the file)."""
    if cfg.annotations is None:
        return {}, None
    coco = load_coco(Path(cfg.annotations))
    images = {Path(entry["file_name"]).name: image_id for image_id, entry in coco.imgs.items()}
    ids = sorted(coco.cats)
    names = [coco.cats[cat_id]["name"] for cat_id in ids]
    return images, category_ids_by_name(class_names, names, ids, f"annotations={cfg.annotations!r}")


def relative_names(files: Sequence[Path], output_dir: Path) -> dict[Path, Path]:
    """Each input's path below the inputs' common folder: its ``file_name`` and, under ``output_dir``, its drawn image."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir={str(output_dir)!r} is a file, not a folder")
    root = common_root(list(files))
    names = {file: file.resolve().relative_to(root) for file in files}
    clashing = [file for file, name in names.items() if (output_dir / name).resolve() == file.resolve()]
    if clashing:
        raise ValueError(
            f"output_dir={str(output_dir)!r} would overwrite the input images (e.g. {clashing[0]}); choose another folder"
        )
    return names


class Reader:
    """Reads images, skipping (and naming) the unreadable ones or stopping at the first, as ``on_error`` says."""

    def __init__(self, on_error: str, bar: tqdm):
        self.on_error, self.bar = on_error, bar
        self.skipped: list[tuple[Path, str]] = []

    def failed(self, file: Path, error: Exception) -> None:
        if self.on_error == "stop":
            raise ValueError(f"{error} (on_error=skip would skip it and go on)") from None
        self.skipped.append((file, str(error)))
        self.bar.write(f"skipped: {error}", file=sys.stderr)
        self.bar.update(1)

    def size(self, file: Path) -> tuple[int, int] | None:
        """(height, width) as viewers show the image, from the file's header, without decoding it."""
        try:
            with open_image(file) as image:
                return upright_size(image)
        except (ValueError, FileNotFoundError) as error:
            self.failed(file, error)
            return None

    def image(self, file: Path) -> Image.Image | None:
        try:
            return load_rgb_image(file, as_viewed=True)
        except (ValueError, FileNotFoundError) as error:
            self.failed(file, error)
            return None


def predict(cfg: PredictConfig) -> PredictSummary:
    files = find_images(cfg.input)
    output_dir = Path(cfg.output_dir)
    names = relative_names(files, output_dir)
    predictor = Predictor.from_checkpoint(
        cfg.ckpt_path, dilation=cfg.dilation, allowed_targets=cfg.allowed_targets, **predictor_options(cfg)
    )
    image_ids, category_ids = annotation_ids(cfg, predictor.class_names)
    category_ids = category_ids or predictor.category_ids
    rows: list[dict[str, Any]] = []
    summary = PredictSummary(0, 0)
    with tqdm(total=len(files), unit="image", disable=not cfg.progress, file=sys.stderr) as bar:
        reader = Reader(cfg.on_error, bar)
        sizes = {file: size for file in files if (size := reader.size(file)) is not None}
        readable = list(sizes)
        for group in size_groups([sizes[file] for file in readable], cfg.batch_size):
            loaded = [
                (file, image)
                for file in (readable[index] for index in group)
                if (image := reader.image(file)) is not None
            ]
            if not loaded:
                continue
            for (file, image), detections in zip(loaded, predictor([image for _, image in loaded])):
                rows += detection_rows(detections, category_ids, image_ids.get(file.name), names[file].as_posix())
                if cfg.draw:
                    summary.written.append(save_image(drawn(image, detections), output_dir / names[file]))
                summary.images += 1
                bar.update(1)
    summary.written.insert(0, write_json(output_dir / DETECTIONS_FILE, rows))
    summary.detections, summary.skipped = len(rows), reader.skipped
    return summary


def report(cfg: PredictConfig, summary: PredictSummary) -> str:
    images = f"{summary.images} image{'s' * (summary.images != 1)}"
    drawn_images = f" and {images} drawn" if cfg.draw else ""
    lines = [
        f"{images}: {summary.detections} detections with score >= {cfg.threshold:g}",
        f"wrote {summary.written[0]}{drawn_images} under {cfg.output_dir}",
    ]
    if summary.skipped:
        names = ", ".join(str(file) for file, _ in summary.skipped)
        lines.append(f"skipped {len(summary.skipped)} unreadable image{'s' * (len(summary.skipped) > 1)}: {names}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> PredictSummary:
    with reported():
        cfg = compose_command("predict", PredictConfig, argv or [], __doc__)
        summary = predict(cfg)
    print(report(cfg, summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
