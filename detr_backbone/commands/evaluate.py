"""Score a checkpoint, or a file it was exported to, on a validation set with COCO's box metrics.

    detr-backbone evaluate ckpt_path=outputs/<run>/checkpoints/last.ckpt     # on its run's own validation set
    detr-backbone evaluate ckpt_path=detr-r50-e632da11.pth data=coco \\
        data.val_images=coco/val2017 data.val_annotations=coco/annotations/instances_val2017.json
    detr-backbone evaluate ckpt_path=exports/detector.onnx   # also: the difference to its checkpoint

A train.py checkpoint (and a file exported from one) is scored on the validation set of the run that
wrote it, as its saved config describes it; ``data=`` or any ``data.*`` override scores it on that data
instead. Published weights are scored on the data config (shapes unless overridden).

An exported file (``.onnx``, ``.pt2``, written with ``postprocess=true``) runs through the same data,
pre-processing and metrics as a checkpoint; when the checkpoint it was exported from (its
metadata's ``source``) is there, that is evaluated too, into ``<output_dir>/source/``, and the
differences in AP, AP50 and AP75 are printed and saved.

Writes ``detections.json`` (every query of every image, COCO's results format), for the shapes data and
a YOLO or VOC folder the ground truth as ``ground_truth.json`` (a COCO folder's own annotation file is the
ground truth),
and ``metrics.json``. Every number is COCOeval's of those two files (pycocotools', or
faster-coco-eval's with ``backend=faster_coco_eval``), so anyone can recompute them. Images are resized and normalised by the data config's evaluation transform, as
the training job's validation does, following the detector's input record (``model.input``: ImageNet
normalisation or not, DETR's resize or a square of ``data.size``). Keys: conf/evaluate.yaml and the data group, as Hydra overrides.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset
from tqdm import tqdm

from ..data import CocoDetection, ShapesDataset, build_datamodule
from ..data.coco import instances
from ..data.folder import FolderDetection
from ..data.images import BadImageError
from ..inference.checkpoint import load_detector, saved_run_config
from ..inference.coco_files import category_ids_by_name, detection_rows, write_json
from ..inference.coco_metrics import CocoMetrics, check_coco_backend, coco_metrics, per_class_table
from ..inference.exported import SUFFIX_FORMATS, ExportedPredictor
from ..inference.predictor import DTYPES, Predictor
from ..training.config import DataConfig
from ..validation import require
from .cli import compose_command, override_key, reported

DETECTIONS_FILE, GROUND_TRUTH_FILE, METRICS_FILE = "detections.json", "ground_truth.json", "metrics.json"
COMPARED = ("AP", "AP50", "AP75")  # what an exported file is compared with its checkpoint on


@dataclass
class EvaluateConfig:
    # train.py checkpoint, published weights (DETR, Deformable-DETR, a Hugging Face folder) or an exported .onnx / .pt2
    ckpt_path: Optional[str] = None
    dilation: Optional[bool] = None  # DETR's own checkpoints do not record it: true for their DC5 files
    allowed_targets: list[str] = field(default_factory=list)  # your own _target_ paths a checkpoint may build
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "evaluation"
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    fuse: Optional[bool] = None  # oneDNN-fused frozen-BN ResNet convolutions; null: on a CPU in float32/bfloat16
    progress: bool = True
    backend: str = "pycocotools"  # pycocotools | faster_coco_eval: whose COCOeval computes the metrics

    def __post_init__(self) -> None:
        require(
            self.ckpt_path is not None, "ckpt_path is required: python -m detr_backbone evaluate ckpt_path=<checkpoint>"
        )
        require(self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        check_coco_backend(self.backend)


def dataset_categories(dataset: Dataset) -> tuple[list[str], list[int]]:
    """The dataset's class names and ids: a COCO folder's own, 1..K for the others (COCO numbers from 1)."""
    names = list(dataset.class_names)
    return names, list(dataset.category_ids) if isinstance(dataset, FolderDetection) else list(range(1, len(names) + 1))


def model_category_ids(loaded: Any, names: Sequence[str], ids: Sequence[int], where: str) -> list[int]:
    """The dataset id each of the detector's class rows predicts: by name, or by position for a file without names."""
    if loaded.names_known:
        return category_ids_by_name(loaded.class_names, names, ids, where)
    require(
        len(loaded.class_names) == len(names),
        f"{loaded.path} has {len(loaded.class_names)} unnamed classes but {where} has {len(names)}: {', '.join(names)}",
    )
    return list(ids)


def ground_truth_file(
    cfg: EvaluateConfig, dataset: Dataset, names: Sequence[str], ids: Sequence[int], output_dir: Path
) -> Path:
    """A COCO folder's annotation file; for the shapes and a YOLO or VOC folder, their boxes written as a COCO
    instances file (the images a run reads, their boxes as it reads them; an unreadable image left out)."""
    if isinstance(dataset, CocoDetection):
        return Path(cfg.data.val_annotations)
    if isinstance(dataset, ShapesDataset):
        targets = [dataset.render(index)[1] for index in range(len(dataset))]
        return write_json(output_dir / GROUND_TRUTH_FILE, instances(targets, names, ids))
    targets, files = [], []
    for index in range(len(dataset)):
        try:
            targets.append(dataset.target(index))
        except BadImageError:
            continue
        files.append(dataset.file_name(index))
    return write_json(output_dir / GROUND_TRUTH_FILE, instances(targets, names, ids, files))


def file_name(dataset: Dataset, image_id: int) -> str | None:
    return dataset.file_name(image_id) if isinstance(dataset, FolderDetection) else None


def run_data(run_config: Any) -> DataConfig | None:
    """The data config a train.py run saved, reading its validation set alone (the training set may be
    elsewhere on this machine); None without one."""
    data = run_config.get("data") if isinstance(run_config, dict) else None
    if not isinstance(data, dict):
        return None
    known = {name.name for name in fields(DataConfig)}
    saved = {key: value for key, value in data.items() if key in known}
    saved.update(train_images=saved.get("val_images"), train_annotations=saved.get("val_annotations"))
    saved.update(train_split=saved.get("val_split", DataConfig.val_split))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), saved))


def data_overridden(arguments: Sequence[str]) -> bool:
    """Whether the command line chose the data (``data=...`` or a ``data.*`` key)."""
    return any(override_key(argument).split(".")[0] == "data" for argument in arguments if "=" in argument)


def evaluate(cfg: EvaluateConfig, own_data: bool = False) -> CocoMetrics:
    """COCO metrics of ``cfg.ckpt_path`` on ``cfg.data``'s validation set, or with ``own_data`` on that of
    the train.py run that wrote the checkpoint (or the checkpoint an exported file came from), where it says."""
    output_dir = Path(cfg.output_dir)
    require(not output_dir.exists() or output_dir.is_dir(), f"output_dir={cfg.output_dir!r} is a file, not a folder")
    exported = Path(cfg.ckpt_path).suffix in SUFFIX_FORMATS
    if exported:
        loaded = predictor = ExportedPredictor(cfg.ckpt_path)
        source = loaded.source.get("path")
        run_config = saved_run_config(source) if source and Path(source).is_file() else None
    else:
        loaded = load_detector(cfg.ckpt_path, cfg.dilation, cfg.allowed_targets)
        # COCO evaluation ranks every query of every image, as DETR's does: no threshold, no top-k
        predictor = Predictor.from_loaded(
            loaded, threshold=0.0, top_k=None, device=cfg.device, dtype=cfg.dtype, fuse=cfg.fuse
        )
        run_config = loaded.run_config
    saved_data = run_data(run_config) if own_data else None
    if saved_data is not None:
        cfg = replace(cfg, data=saved_data)
    datamodule = build_datamodule(cfg.data, loaded.input)  # images prepared as the detector takes them
    dataset = datamodule.dataset("val")
    require(len(dataset) > 0, f"the data={cfg.data.kind} validation set has no images")
    names, ids = dataset_categories(dataset)
    category_ids = model_category_ids(loaded, names, ids, f"the data={cfg.data.kind} validation set")
    rows: list[dict[str, Any]] = []
    for images, targets in tqdm(datamodule.val_dataloader(), unit="batch", disable=not cfg.progress, file=sys.stderr):
        original_sizes = torch.stack([target["orig_size"] for target in targets])
        for target, detections in zip(targets, predictor.predict_batch(images, original_sizes)):
            image_id = int(target["image_id"])
            rows += detection_rows(detections, category_ids, image_id, file_name(dataset, image_id))
    detections_file = write_json(output_dir / DETECTIONS_FILE, rows)
    truth = ground_truth_file(cfg, dataset, names, ids, output_dir)
    metrics = coco_metrics(truth, detections_file, cfg.backend)
    metrics.files = {
        "detections": str(detections_file),
        "ground_truth": str(truth),
        "metrics": str(output_dir / METRICS_FILE),
    }
    metrics.data = f"the data={cfg.data.kind} validation set" + (" (the run's own)" if saved_data is not None else "")
    content = {
        "checkpoint": {"path": loaded.path, "kind": "exported file" if exported else loaded.source},
        "data": asdict(cfg.data),
        **metrics.as_json(),
    }
    if exported:
        metrics.source = compared_with_source(cfg, loaded.source.get("path"), metrics, output_dir)
        content["source"] = metrics.source
    write_json(output_dir / METRICS_FILE, content, indent=2)
    return metrics


def compared_with_source(
    cfg: EvaluateConfig, source: str | None, metrics: CocoMetrics, output_dir: Path
) -> dict[str, Any]:
    """The exported file's checkpoint evaluated alike, and the differences (exported - checkpoint)."""
    if not source or not Path(source).exists():
        return {"path": source, "found": False}
    reference = evaluate(replace(cfg, ckpt_path=source, output_dir=str(output_dir / "source")))
    difference = {name: metrics.summary[name] - reference.summary[name] for name in COMPARED}
    return {"path": source, "found": True, "summary": reference.summary, "difference": difference}


def source_line(source: dict[str, Any]) -> str:
    if not source["found"]:
        return f"its checkpoint {source['path']} is not there: no comparison"
    differences = ", ".join(f"{name} {value:+.4f}" for name, value in source["difference"].items())
    return f"against its checkpoint {source['path']}: {differences} (exported - checkpoint)"


def report(cfg: EvaluateConfig, metrics: CocoMetrics) -> str:
    files = ", ".join(metrics.files.values())
    source = [source_line(metrics.source)] if metrics.source is not None else []
    return "\n".join(
        [
            f"{cfg.ckpt_path} on {metrics.data}: {metrics.images} images, {metrics.detections} detections",
            metrics.summary_text,
            "",
            per_class_table(metrics),
            "",
            *source,
            f"files: {files}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> CocoMetrics:
    with reported():
        cfg = compose_command("evaluate", EvaluateConfig, argv or [], __doc__)
        metrics = evaluate(cfg, own_data=not data_overridden(argv or []))
    print(report(cfg, metrics))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
