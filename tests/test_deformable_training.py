"""The Deformable-DETR head in the training job: levels, parameter groups, precisions, resume, DDP, reloading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detr_backbone import nested_tensor_from_tensor_list
from detr_backbone.commands.evaluate import main as evaluate_main
from detr_backbone.data import IMAGENET_MEAN, IMAGENET_STD
from detr_backbone.detection.deformable import DeformableDETR
from detr_backbone.inference import Predictor, load_detector
from detr_backbone.training.job import Job, validated
from detr_backbone.training.module import DetrModule

from .jobs import TINY, compose_config
from .test_commands import COCO_STATS, cocoeval
from .test_distributed import ONE_PER_BATCH, run_train

DEFORMABLE = [
    "model=deformable_detr_small",
    "model.num_queries=5",
    "model.enc_layers=1",
    "model.dec_layers=2",
    "model.dim_feedforward=64",
]


def job(tmp_path: Path, *overrides: str) -> Job:
    return Job(validated(compose_config(*TINY, *DEFORMABLE, *overrides)), tmp_path)


def test_the_head_reads_deformables_levels_and_groups_its_projections(tmp_path):
    module = job(tmp_path, "lr=3e-4", "lr_backbone=2e-5").module
    joiner = module.detector.backbone
    assert isinstance(module.detector, DeformableDETR)
    assert joiner.strides == [8, 16, 32] and joiner.num_channels == [128, 256, 512]  # layers 2-4 of the ResNet-18
    assert module.hparams["joiner"]["backbone"]["levels"] == [2, 3, 4]
    optimizer = module.build_optimizer()
    names = {id(p): n for n, p in module.named_parameters()}
    groups = {g["name"]: (g["lr"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups}
    assert list(groups) == ["head", "backbone", "linear_projection"]
    lr, projections = groups["linear_projection"]
    assert lr == pytest.approx(3e-5)
    assert projections and all(("sampling_offsets" in n or "reference_points" in n) for n in projections)
    assert not projections & groups["head"][1] and groups["backbone"][0] == 2e-5
    every = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set().union(*(members for _, members in groups.values())) == every


def test_backbone_levels_given_are_kept_and_an_extra_level_is_added(tmp_path):
    module = job(tmp_path, "backbone.levels=[3,4]", "model.num_feature_levels=3").module
    assert module.detector.backbone.strides == [16, 32] and len(module.detector.input_proj) == 3


@pytest.mark.parametrize(("levels", "strides", "body_ends"), [(1, [32], "layer4"), (2, [8, 16], "layer3")])
def test_one_or_two_levels_read_layer4_alone_or_layers_2_and_3_and_the_body_stops_there(
    tmp_path, levels, strides, body_ends
):
    module = job(tmp_path, f"model.num_feature_levels={levels}").module
    joiner = module.detector.backbone
    assert joiner.strides == strides and len(module.detector.input_proj) == levels
    assert list(dict(joiner[0].body.named_children()))[-1] == body_ends


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "bf16-true"])
@pytest.mark.slow
def test_every_precision_trains(tmp_path, precision):
    run = job(tmp_path, f"precision={precision}", "trainer.fast_dev_run=2", "test_after_fit=false")
    run.run()
    assert torch.isfinite(run.trainer.callback_metrics["train/loss"])
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert run.module.detector.class_embed[0].weight.dtype == dtype


@pytest.mark.slow
def test_refinement_and_two_stage_train_and_log_only_the_final_losses(tmp_path):
    run = job(
        tmp_path, "model.with_box_refine=true", "model.two_stage=true", "trainer.fast_dev_run=1", "test_after_fit=false"
    )
    run.run()
    logged = set(run.trainer.callback_metrics)
    assert {"train/loss", "train/loss_ce", "train/loss_bbox", "train/loss_giou"} <= logged
    assert not any(name.endswith(("_enc", "_0")) for name in logged)


@pytest.mark.slow
def test_resume_continues_and_reloads_for_evaluation_and_prediction(tmp_path):
    common = ("lr_drop=1", "test_after_fit=false")
    straight = job(tmp_path / "straight", *common, "trainer.max_epochs=2")
    straight.run()
    job(tmp_path / "first", *common, "trainer.max_epochs=1").run()
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = job(tmp_path / "resumed", *common, "trainer.max_epochs=2", f"ckpt_path={last}")
    resumed.run()
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    assert [g["lr"] for g in resumed.trainer.optimizers[0].param_groups] == pytest.approx([2e-6, 2e-6, 2e-7])
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    checkpoint = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    loaded = DetrModule.load_from_checkpoint(checkpoint, weights_only=True).eval()
    images, _ = next(iter(resumed.datamodule.val_dataloader()))
    resumed.module.eval()
    with torch.no_grad():
        expected = resumed.module(images)
        torch.testing.assert_close(loaded(images)["pred_boxes"], expected["pred_boxes"])
    detector = load_detector(checkpoint)
    assert isinstance(detector.detector, DeformableDETR) and detector.class_names == [
        "rectangle",
        "ellipse",
        "triangle",
    ]
    # the Predictor's detections are the head's own top-k post-processing of the same image
    raw = torch.rand(3, 56, 72, generator=torch.Generator().manual_seed(0))
    found = Predictor.from_loaded(detector, size=None, threshold=0.0)([raw])[0]
    normalized = (raw - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        single = resumed.module(nested_tensor_from_tensor_list([normalized]))
        scores, labels, boxes = resumed.module.detector.detections(single, torch.tensor([[56, 72]]))
    assert len(found) == scores.shape[1]
    torch.testing.assert_close(found.scores, scores[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(found.boxes, boxes[0], rtol=1e-4, atol=1e-3)
    assert torch.equal(found.labels, labels[0])
    # evaluate: COCO's numbers of the head's detections, equal to pycocotools' on the files it wrote
    evaluate_main([f"ckpt_path={checkpoint}", "data.val_size=4", f"output_dir={tmp_path / 'eval'}", "progress=false"])
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    reference = cocoeval(tmp_path / "eval" / "ground_truth.json", tmp_path / "eval" / "detections.json")
    assert saved["summary"] == dict(zip(COCO_STATS, reference.stats.tolist()))
    assert len(json.loads((tmp_path / "eval" / "detections.json").read_text())) == 4 * 15  # top-k: all 5 x 3 pairs


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    result = run_train(
        tmp_path, *ONE_PER_BATCH, *DEFORMABLE, "trainer=ddp", "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path}/run"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (checkpoint["global_step"], checkpoint["epoch"]) == (4, 0)
    assert (
        checkpoint["hyper_parameters"]["head"]["_target_"] == "detr_backbone.detection.deformable.build_deformable_detr"
    )


@pytest.mark.parametrize("backbone", [("backbone=resnet50",), ("backbone=timm", "backbone.name=convnext_tiny")])
@pytest.mark.slow
def test_the_published_head_runs_on_a_resnet_50_and_a_timm_model(tmp_path, backbone):
    # python train.py model=deformable_detr backbone=..., on TINY's small data for one step
    config = validated(
        compose_config(*TINY, *backbone, "model=deformable_detr", "trainer.fast_dev_run=1", "test_after_fit=false")
    )
    run = Job(config, tmp_path)
    assert run.module.detector.backbone.strides == [8, 16, 32] and len(run.module.detector.input_proj) == 4
    assert run.module.detector.num_feature_levels == 4  # three backbone levels and one stride-2 convolution
    run.run()
    assert torch.isfinite(run.trainer.callback_metrics["train/loss"])
