"""evaluation.backend / evaluate's backend: pycocotools' and faster-coco-eval's COCOeval give the same numbers;
evaluation.class_metrics: the per-class mAP logged by validation against COCOeval's own."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from torchmetrics.detection import MeanAveragePrecision

from detr_backbone.commands.evaluate import main as evaluate_main
from detr_backbone.data import build_datamodule
from detr_backbone.inference.coco_metrics import STAT_NAMES, coco_metrics
from detr_backbone.training.job import validated
from detr_backbone.training.module import DetrModule

from .jobs import SMALL, compose_config
from .tiny_checkpoint import CLASS_NAMES, train_tiny_checkpoint


def noisy_detections(seed: int = 0, images: int = 30, classes: int = 4):
    """Ground truth and scored detections around it (shifted copies, wrong classes, strays), in pixels."""
    generator = torch.Generator().manual_seed(seed)
    truths, predictions = [], []
    for _ in range(images):
        count = int(torch.randint(1, 5, (1,), generator=generator))
        corner = torch.rand(count, 2, generator=generator) * 200
        boxes = torch.cat([corner, corner + 8 + torch.rand(count, 2, generator=generator) * 90], 1)
        labels = torch.randint(0, classes, (count,), generator=generator)
        strays = torch.rand(6, 2, generator=generator) * 200
        found = torch.cat([boxes + torch.randn(count, 4, generator=generator) * 6, torch.cat([strays, strays + 40], 1)])
        found_labels = torch.cat([labels, torch.randint(0, classes, (6,), generator=generator)])
        truths.append({"boxes": boxes, "labels": labels})
        predictions.append(
            {"boxes": found, "labels": found_labels, "scores": torch.rand(len(found), generator=generator)}
        )
    return truths, predictions


def coco_files(tmp_path, truths, predictions, names):
    """The case as a COCO instances file and a results file (category id = label + 1)."""
    images, annotations, results = [], [], []
    for image_id, (truth, found) in enumerate(zip(truths, predictions), start=1):
        images.append({"id": image_id, "width": 320, "height": 320, "file_name": f"{image_id}.png"})
        for box, label in zip(truth["boxes"].tolist(), truth["labels"].tolist()):
            width, height = box[2] - box[0], box[3] - box[1]
            bbox = [box[0], box[1], width, height]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1, "bbox": bbox}
                | {"area": width * height, "iscrowd": 0}
            )
        for box, label, score in zip(found["boxes"].tolist(), found["labels"].tolist(), found["scores"].tolist()):
            bbox = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            results.append({"image_id": image_id, "category_id": label + 1, "bbox": bbox, "score": score})
    categories = [{"id": label + 1, "name": name} for label, name in enumerate(names)]
    truth_file, results_file = tmp_path / "truth.json", tmp_path / "results.json"
    truth_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    results_file.write_text(json.dumps(results))
    return truth_file, results_file


def test_both_backends_give_the_same_metrics(tmp_path):
    truths, predictions = noisy_detections()
    names = ["cat", "dog", "cow", "owl"]
    files = coco_files(tmp_path, truths, predictions, names)
    slow, fast = (coco_metrics(*files, backend) for backend in ("pycocotools", "faster_coco_eval"))
    assert 0.2 < slow.summary["AP50"] < 0.9  # a case with something to rank
    # the same to the last bit on this case, as measured
    assert fast.summary == slow.summary and list(fast.summary) == list(STAT_NAMES)
    assert fast.per_class == slow.per_class and list(slow.per_class) == names

    results = []
    for backend in ("pycocotools", "faster_coco_eval"):
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=backend, class_metrics=True)
        metric.update(predictions, truths)
        results.append(metric.compute())
    for key in ("map", "map_50", "map_75", "mar_100", "map_per_class"):
        assert torch.equal(results[1][key], results[0][key]), key


def test_bad_backends_are_named(tmp_path):
    with pytest.raises(ValueError, match="evaluation.backend='detectron2' is not one of pycocotools, faster_coco_eval"):
        validated(compose_config(*SMALL, "evaluation.backend=detectron2"))
    with pytest.raises(ValueError, match="backend='coco' is not one of pycocotools, faster_coco_eval"):
        coco_metrics(tmp_path / "truth.json", tmp_path / "results.json", "coco")


def test_validation_logs_each_classs_map_as_cocoeval_computes_it(tiny_checkpoint, tmp_path, one_thread):
    module = DetrModule.load_from_checkpoint(tiny_checkpoint, weights_only=True)
    assert module.val_map.class_metrics  # evaluation.class_metrics defaults to true
    seen = []
    update = module.val_map.update
    module.val_map.update = lambda predictions, targets: (
        seen.append((predictions, targets)),
        update(predictions, targets),
    )
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    data = build_datamodule(validated(compose_config(*SMALL, "data.val_size=12")).data)
    logged = trainer.validate(module, datamodule=data, verbose=False)[0]

    truths = [target for _, targets in seen for target in targets]
    predictions = [prediction for predictions, _ in seen for prediction in predictions]
    # pycocotools' COCOeval of the same detections written as COCO files, per class from its precision array
    expected = coco_metrics(*coco_files(tmp_path, truths, predictions, CLASS_NAMES)).per_class
    assert {key for key in logged if key.startswith("val/map_per_class/")} == {
        f"val/map_per_class/{name}" for name in CLASS_NAMES
    }
    assert any(expected[name]["AP"] > 0 for name in CLASS_NAMES)  # the tiny detector finds something
    for name in CLASS_NAMES:
        assert logged[f"val/map_per_class/{name}"] == pytest.approx(expected[name]["AP"], abs=1e-6), name


@pytest.mark.slow
def test_class_metrics_off_logs_no_class_and_evaluate_takes_either_backend(tmp_path):
    checkpoint = train_tiny_checkpoint(tmp_path / "run", "evaluation.class_metrics=false")
    module = DetrModule.load_from_checkpoint(checkpoint, weights_only=True)
    assert not module.val_map.class_metrics and not module.test_map.class_metrics
    assert module.hparams["evaluation"] == {"backend": "pycocotools", "class_metrics": False}

    runs = [
        evaluate_main(
            [f"ckpt_path={checkpoint}", f"output_dir={tmp_path / backend}", "progress=false", f"backend={backend}"]
        )
        for backend in ("pycocotools", "faster_coco_eval")
    ]
    assert runs[0].summary == runs[1].summary and runs[0].per_class == runs[1].per_class
    assert runs[0].detections > 0
    with pytest.raises(SystemExit, match="backend='fast' is not one of pycocotools, faster_coco_eval"):
        evaluate_main([f"ckpt_path={checkpoint}", "backend=fast"])
