"""Hydra configs: the real conf/ tree composes, validates, builds, and train.py runs from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from detr_backbone import GroupNormBackbone, PositionEmbeddingLearned, TimmBackbone, build_backbone
from detr_backbone.config import BackboneConfig, CustomBackboneConfig, CustomPositionConfig
from detr_backbone.training.config import Config
from detr_backbone.training.job import validated
from detr_backbone.training.recipe import RecipeWarning, recipe_mismatch, warn_of_recipe_mismatch

from .jobs import ROOT, SMALL, TINY, compose_config

COCO_PATHS = ("train_images", "train_annotations", "val_images", "val_annotations")


def test_every_group_option_composes_against_the_schema():
    backbones = sorted(p.stem for p in (ROOT / "conf" / "backbone").glob("*.yaml"))
    assert backbones == [
        "custom",
        "hgnetv2_b0",
        "hgnetv2_b1",
        "hgnetv2_b2",
        "hgnetv2_b3",
        "hgnetv2_b4",
        "hgnetv2_b5",
        "hgnetv2_h",
        "hgnetv2_l",
        "hgnetv2_x",
        "resnet101",
        "resnet101_gn",
        "resnet101vd",
        "resnet18",
        "resnet18_gn",
        "resnet18vd",
        "resnet34vd",
        "resnet50",
        "resnet50_gn",
        "resnet50vd",
        "timm",
    ]
    models = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
    # every backbone with an encoding, the encodings taking turns (the groups do not read each other)
    for index, backbone in enumerate(backbones[1:]):
        position = ("sine", "learned")[index % 2]
        config = validated(compose_config(f"backbone={backbone}", f"position={position}"))  # the schemas' own checks
        assert isinstance(config.backbone, BackboneConfig) and config.position.kind == position
    for model in models:
        assert validated(compose_config(f"model={model}")).model._target_.startswith("detr_backbone.detection.")
    own = validated(
        compose_config(
            "backbone=custom",
            "backbone._target_=my_lab.make_backbone",
            "position=custom",
            "position._target_=my_lab.Encoding",
            "+backbone.depth=3",
            "+position.period=7.5",
        )
    )
    assert isinstance(own.backbone, CustomBackboneConfig) and own.backbone.arguments == {"depth": 3}
    assert isinstance(own.position, CustomPositionConfig) and own.position.arguments == {"period": 7.5}


def test_top_level_knobs_reach_the_backbone_group():
    cfg = compose_config("backbone=resnet101_gn", "dilation=true", "return_interm_layers=true", "freeze_backbone=true")
    assert (cfg.backbone._target_, cfg.backbone.name) == ("detr_backbone.GroupNormBackbone", "resnet101")
    assert cfg.backbone.dilation and cfg.backbone.return_interm_layers and cfg.backbone.freeze
    joiner = build_backbone(cfg)
    assert isinstance(joiner[0], GroupNormBackbone) and joiner[0].strides == [4, 8, 16, 16]
    assert not any(p.requires_grad for p in joiner.parameters())


def test_group_values_build_the_right_modules():
    cfg = compose_config("backbone=timm", "backbone.name=efficientnet_b0", "position=learned", "hidden_dim=64")
    joiner = build_backbone(cfg)
    assert isinstance(joiner[0], TimmBackbone) and isinstance(joiner[1], PositionEmbeddingLearned)
    assert joiner[1].row_embed.weight.shape == (50, 32) and joiner.num_channels == 320


def test_misspelled_key_and_bad_type_fail_at_composition():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("backbone.dilaton=true")
    assert "dilaton" in str(error.value.__cause__)
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("hidden_dim=big")
    assert "hidden_dim" in str(error.value.__cause__)


def test_schema_defaults_match_detr():
    cfg = Config()
    assert (cfg.hidden_dim, cfg.lr_backbone, cfg.position.temperature, cfg.position.normalize) == (
        256,
        1e-5,
        10000.0,
        True,
    )


def run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={cwd}/run", f"hydra.sweep.dir={cwd}/multirun"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_train_py_writes_its_run_folder(tmp_path):
    result = run_train(*TINY, "position=learned", "logger=tensorboard", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert saved.backbone.name == "resnet18" and saved.position._target_ == "detr_backbone.PositionEmbeddingLearned"
    assert (run / "checkpoints" / "last.ckpt").is_file() and len(
        list((run / "checkpoints").glob("epoch000-*.ckpt"))
    ) == 1
    metrics = (run / "csv" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert {"train/loss", "val/map_50", "test/map_50", "lr-AdamW/head"} <= set(header)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_train_py_sweep_writes_one_folder_per_job(tmp_path):
    # the SMALL job (no test stage, no grids): what is checked is one folder, config and checkpoint per job
    result = run_train("-m", *SMALL, "position=sine,learned", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted(p.name for p in (tmp_path / "multirun").iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    assert [OmegaConf.load(tmp_path / "multirun" / j / ".hydra" / "config.yaml").position._target_ for j in jobs] == [
        "detr_backbone.PositionEmbeddingSine",
        "detr_backbone.PositionEmbeddingLearned",
    ]
    assert all((tmp_path / "multirun" / j / "checkpoints" / "last.ckpt").is_file() for j in jobs)


@pytest.mark.slow
def test_train_py_reports_a_bad_value_in_one_line(tmp_path):
    result = run_train("backbone._target_=detr_backbone.ResNet", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: backbone._target_='detr_backbone.ResNet' is not one of detr_backbone.Backbone, "
        "detr_backbone.GroupNormBackbone, detr_backbone.TimmBackbone, detr_backbone.ResNetVdBackbone"
    )


def test_the_deformable_detr_coco_preset_is_the_published_recipe():
    cfg = validated(compose_config("experiment=deformable_detr_r50_coco", *(f"data.{s}=x" for s in COCO_PATHS)))
    assert (cfg.backbone.name, cfg.backbone.pretrained, cfg.hidden_dim) == ("resnet50", True, 256)
    assert cfg.model._target_ == "detr_backbone.detection.deformable.build_deformable_detr"
    assert (cfg.model.num_queries, cfg.model.enc_layers, cfg.model.dec_layers, cfg.model.num_feature_levels) == (
        300,
        6,
        6,
        4,
    )
    assert (cfg.lr, cfg.lr_backbone, cfg.model.lr_linear_proj_mult, cfg.weight_decay) == (2e-4, 2e-5, 0.1, 1e-4)
    assert (cfg.trainer.max_epochs, cfg.lr_drop, cfg.clip_max_norm) == (50, 40, 0.1)
    assert (cfg.optimizer.schedule, cfg.optimizer.warmup_steps) == ("step", 0)  # not the default job's
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 32 and cfg.trainer.strategy == "ddp"
    assert recipe_mismatch(cfg) is None


def test_a_coco_sized_model_on_the_shapes_data_and_coco_with_the_cpu_model_are_warned_of():
    assert recipe_mismatch(validated(compose_config())) is None  # the default job
    assert recipe_mismatch(validated(compose_config("model=deformable_detr", "hidden_dim=256"))) == (
        "hidden_dim=256 and model.num_queries=300 on data=shapes: a COCO-sized model on the embedded shapes data "
        "(a few shapes on 48-64 px images), sized for the default job's model (model=dino_small, hidden_dim=128); "
        "for your own data give data=coco, data=yolo or data=voc with its folder, or experiment=dino_r50_coco, "
        "experiment=deformable_detr_r50_coco or experiment=detr_r50_coco"
    )
    coco = validated(compose_config("data=coco", *(f"data.{s}=x" for s in COCO_PATHS)))
    assert recipe_mismatch(coco) == (
        "data=coco with the CPU default job's model (hidden_dim=128, model.num_queries=20, and a backbone of random "
        "weights (backbone.pretrained=false)); the published recipes: experiment=dino_r50_coco, "
        "experiment=deformable_detr_r50_coco or experiment=detr_r50_coco"
    )
    with pytest.warns(RecipeWarning, match="^data=coco with the CPU default job's model"):
        warn_of_recipe_mismatch(coco)
    yolo = validated(compose_config("data=yolo", "data.root=x"))
    assert recipe_mismatch(yolo).startswith("data=yolo with the CPU default job's model (hidden_dim=128, ")
