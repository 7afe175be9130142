"""The training job: parameter groups, what moves and what stays, resume, reload, precisions, backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_backbone import FrozenBatchNorm2d
from detr_backbone.training.job import Job, validated
from detr_backbone.training.module import DetrModule

from .jobs import TINY, compose_config


def job(tmp_path: Path, *overrides: str) -> Job:
    return Job(validated(compose_config(*TINY, *overrides)), tmp_path)


def groups_of(module: DetrModule) -> dict[str, tuple[float, set[str]]]:
    optimizer = module.build_optimizer()
    names = {id(p): n for n, p in module.named_parameters()}
    return {g["name"]: (g["lr"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups}


def names_under(module: DetrModule, prefix: str, trainable_only: bool = True) -> set[str]:
    return {n for n, p in module.named_parameters() if n.startswith(prefix) and (p.requires_grad or not trainable_only)}


# --- parameter groups ------------------------------------------------------------------------


def test_groups_with_a_trained_backbone(tmp_path):
    module = job(tmp_path, "lr=3e-4", "lr_backbone=2e-5").module
    groups = groups_of(module)
    assert list(groups) == ["head", "backbone"]
    head = {n for n, _ in module.named_parameters() if not n.startswith("detector.backbone.")}
    assert groups["head"] == (3e-4, head)
    assert {n.split(".")[0] for n in head} == {"detector"}
    assert {n.split(".")[1] for n in head} == {"transformer", "input_proj", "query_embed", "class_embed", "bbox_embed"}
    backbone = groups["backbone"]
    assert backbone[0] == 2e-5
    assert backbone[1] == {
        n
        for n in names_under(module, "detector.backbone.0.body.", False)
        if n.split(".")[4] in ("layer2", "layer3", "layer4")
    }


def test_groups_with_a_frozen_backbone_and_learned_table(tmp_path):
    module = job(tmp_path, "lr_backbone=0", "position=learned").module
    assert list(groups_of(module)) == ["head"]
    assert not names_under(module, "detector.backbone.")
    module = job(tmp_path, "lr_backbone=0", "position=learned", "position.lr=1e-4").module
    groups = groups_of(module)
    assert groups["position"] == (
        1e-4,
        {"detector.backbone.1.row_embed.weight", "detector.backbone.1.col_embed.weight"},
    )
    assert "backbone" not in groups


def test_groups_with_freeze_backbone_and_the_default_table_lr(tmp_path):
    assert list(groups_of(job(tmp_path, "freeze_backbone=true", "position=learned").module)) == ["head"]
    groups = groups_of(job(tmp_path, "position=learned", "lr_backbone=3e-5").module)
    assert [(name, lr) for name, (lr, _) in groups.items()] == [("head", 2e-4), ("backbone", 3e-5), ("position", 3e-5)]


# --- a real fit ------------------------------------------------------------------------------


@pytest.mark.slow
def test_frozen_tensors_stay_bit_identical_and_trainable_ones_move(tmp_path):
    run = job(tmp_path, "trainer.max_steps=3", "test_after_fit=false", "lr=1e-3", "lr_backbone=1e-3")
    before = {k: v.clone() for k, v in run.module.state_dict().items()}
    trainable = {n for n, p in run.module.named_parameters() if p.requires_grad}
    run.run()
    after = run.module.state_dict()
    frozen_bn = {
        f"{name}.{buffer}"
        for name, m in run.module.named_modules()
        if isinstance(m, FrozenBatchNorm2d)
        for buffer in ("weight", "bias", "running_mean", "running_var")
    }
    assert len(frozen_bn) == 20 * 4
    unchanged = {k for k in before if torch.equal(before[k], after[k])}
    assert frozen_bn <= unchanged
    assert names_under(run.module, "detector.backbone.0.body.conv1", False) <= unchanged  # the stem is frozen
    assert names_under(run.module, "detector.backbone.0.body.layer1", False) <= unchanged
    assert trainable - unchanged == trainable


@pytest.mark.slow
def test_resume_continues_step_epoch_optimizer_and_schedule(tmp_path):
    common = ("lr_drop=1", "test_after_fit=false")
    straight = job(tmp_path / "straight", *common, "trainer.max_epochs=2")
    straight.run()
    first = job(tmp_path / "first", *common, "trainer.max_epochs=1")
    first.run()
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["epoch"] == 0
    resumed = job(tmp_path / "resumed", *common, "trainer.max_epochs=2", f"ckpt_path={last}")
    resumed.run()
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    assert resumed.trainer.current_epoch == 2
    optimizer = resumed.trainer.optimizers[0]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-6, 2e-6])  # dropped tenfold twice
    state = next(iter(optimizer.state.values()))
    assert int(state["step"]) == 4
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_load_from_checkpoint_rebuilds_the_same_model_with_weights_only(tmp_path):
    run = job(tmp_path, "trainer.max_steps=2", "test_after_fit=false", "position=learned")
    run.run()
    loaded = DetrModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert loaded.state_dict().keys() == run.module.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), run.module.state_dict().values()))
    images, _ = next(iter(run.datamodule.val_dataloader()))
    run.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images)["pred_boxes"], run.module(images)["pred_boxes"])


# --- precisions and backbones ----------------------------------------------------------------


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "bf16-true"])
@pytest.mark.slow
def test_every_precision_trains(tmp_path, precision):
    run = job(tmp_path, f"precision={precision}", "trainer.fast_dev_run=2", "test_after_fit=false")
    run.run()
    loss = run.trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert run.module.detector.class_embed.weight.dtype == dtype
    # Lightning clips no fused optimizer under its mixed-precision plugin
    assert run.trainer.optimizers[0].defaults["fused"] is precision.endswith("-true")


@pytest.mark.parametrize(
    "overrides",
    [
        ("backbone=resnet50", "dilation=true", "position=learned"),
        ("backbone=resnet101_gn", "dilation=true"),
        ("backbone=timm", "backbone.name=efficientnet_b0", "position=learned"),
        ("backbone=timm", "backbone.name=convnext_atto", "dilation=true"),
        ("backbone=resnet18_gn", "return_interm_layers=true"),
    ],
)
@pytest.mark.slow
def test_backbone_position_dilation_combinations_train(tmp_path, overrides):
    run = job(tmp_path, *overrides, "trainer.fast_dev_run=1", "test_after_fit=false")
    run.run()
    assert run.trainer.global_step == 1 and torch.isfinite(run.trainer.callback_metrics["train/loss"])


@pytest.mark.slow
def test_run_returns_the_monitored_metric_for_sweepers(tmp_path):
    run = job(tmp_path, "trainer.max_epochs=1", "test_after_fit=false")
    value = run.run()
    assert value == pytest.approx(float(run.trainer.callback_metrics["val/map_50"]))
    assert 0.0 <= value <= 1.0
