"""``_target_`` configs: a backbone and an encoding of one's own, and what a checkpoint may build."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from detr_backbone import build_backbone, downsample_mask, nested_tensor_from_tensor_list
from detr_backbone.backbones.declared_backbone import DeclaredBackbone
from detr_backbone.commands.export import main as export_main
from detr_backbone.inference.checkpoint import load_detector
from detr_backbone.targets import TargetNotAllowedError
from detr_backbone.training.job import Job, validated
from detr_backbone.training.module import DetrModule, load_training_module

from .custom_parts import RampEncoding
from .jobs import ROOT, SMALL, compose_config

BACKBONE = "tests.custom_parts.make_tiny_backbone"
ENCODING = "tests.custom_parts.RampEncoding"
OWN_PARTS = [
    "backbone=custom",
    f"backbone._target_={BACKBONE}",
    "+backbone.width=8",
    "backbone.levels=[2,3]",
    "backbone.trainable_layers=2",
    "position=custom",
    f"position._target_={ENCODING}",
    "+position.period=5.0",
    "hidden_dim=32",
]


def joiner_of(backbone: dict, position: dict | None = None, lr_backbone: float = 1e-4):
    config = {"backbone": backbone, "position": position or {}, "hidden_dim": 16, "lr_backbone": lr_backbone}
    return build_backbone(config)


def trainable_prefixes(module: torch.nn.Module) -> set[str]:
    return {name.split(".")[1] for name, p in module.named_parameters() if p.requires_grad}


def test_own_backbone_gets_level_selection_masks_positions_and_freezing():
    joiner = joiner_of({"_target_": BACKBONE, "width": 8, "levels": [2, 3], "trainable_layers": 2})
    assert isinstance(joiner[0], DeclaredBackbone)
    assert joiner.strides == [8, 16] and joiner.num_channels == [16, 32] and joiner.feature_channels == [16, 32]
    images = nested_tensor_from_tensor_list([torch.randn(3, 64, 96), torch.randn(3, 48, 64)])
    features, positions = joiner(images)
    assert [tuple(f.tensors.shape) for f in features] == [(2, 16, 8, 12), (2, 32, 4, 6)]
    for feature in features:
        assert torch.equal(feature.mask, downsample_mask(images.mask, feature.tensors.shape[-2:]))
    assert [tuple(p.shape) for p in positions] == [(2, 16, 8, 12), (2, 16, 4, 6)]
    # the declared stages are the last ones: two trainable layers are stage2 and stage3
    assert trainable_prefixes(joiner[0]) == {"stage2", "stage3"}
    detr_rule = joiner_of({"_target_": BACKBONE, "width": 8})
    assert trainable_prefixes(detr_rule[0]) == {"stage1", "stage2", "stage3"}  # DETR's rule: the last three
    assert detr_rule.num_channels == 32 and detr_rule.strides == [16]  # DETR's spellings: the last map, an int


def test_any_timm_builder_declares_through_feature_info():
    spec = {"_target_": "timm.create_model", "model_name": "resnet18", "features_only": True, "out_indices": [2, 3, 4]}
    joiner = joiner_of({**spec, "return_interm_layers": True, "trainable_layers": 1})
    assert joiner.strides == [8, 16, 32] and joiner[0].feature_channels == [128, 256, 512]
    assert trainable_prefixes(joiner[0]) == {"layer4"}
    assert [f.tensors.shape[1] for f in joiner(nested_tensor_from_tensor_list([torch.randn(3, 64, 64)]))[0]] == [
        128,
        256,
        512,
    ]


def test_own_encoding_is_called_with_num_pos_feats_and_its_arguments():
    joiner = joiner_of({"_target_": BACKBONE}, {"_target_": ENCODING, "period": 4.0})
    assert isinstance(joiner[1], RampEncoding) and joiner[1].channels == 16 and joiner[1].period == 4.0
    (_feature,), (position,) = joiner(nested_tensor_from_tensor_list([torch.randn(3, 64, 64)]))
    assert position.shape == (1, 16, 4, 4) and position[0, 3, 2, 1] == pytest.approx((2 + 1) / 4.0 + 3)


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        (
            {"_target_": "no_such_package.make"},
            "backbone._target_='no_such_package.make' cannot be imported: no module named 'no_such_package' (is it installed and on sys.path?)",
        ),
        (
            {"_target_": "tests.custom_parts.make_big_backbone"},
            "backbone._target_='tests.custom_parts.make_big_backbone' cannot be imported: tests.custom_parts has no attribute 'make_big_backbone'",
        ),
        (
            {"_target_": "tests.custom_parts.NOT_CALLABLE"},
            "backbone._target_='tests.custom_parts.NOT_CALLABLE' is a int, not a class or function that builds the part",
        ),
        (
            {"_target_": "make backbone"},
            "backbone._target_='make backbone' is not a dotted path to a class or function, e.g. my_pkg.backbones.make_backbone",
        ),
        (
            {"_target_": "tests.custom_parts.Undeclared"},
            "backbone._target_='tests.custom_parts.Undeclared' built a Undeclared that does not declare its feature maps: give it `num_channels` and `strides` lists, one entry per returned map (as Deformable-DETR's backbones), or timm's `feature_info`",
        ),
        (
            {"_target_": BACKBONE, "depth": 3},
            f"backbone._target_='{BACKBONE}' failed with depth: TypeError: make_tiny_backbone() got an unexpected keyword argument 'depth'",
        ),
        (
            {"_target_": "tests.custom_parts.Unstaged", "trainable_layers": 2},
            "backbone.trainable_layers=2 needs the stages of 'tests.custom_parts.Unstaged' declared: give it `stage_modules` (the submodules that end each stage), or use 0 or 5",
        ),
        (
            {"_target_": BACKBONE, "levels": [2, 4]},
            "levels=[2, 4] must be increasing stage numbers in 1..3, e.g. [2, 3, 4]",
        ),
        (
            {"_target_": "detr_backbone.ResNet"},
            "backbone._target_='detr_backbone.ResNet' is not one of detr_backbone.Backbone, detr_backbone.GroupNormBackbone, detr_backbone.TimmBackbone, detr_backbone.ResNetVdBackbone",
        ),
    ],
)
def test_bad_targets_fail_in_one_line(backbone, message):
    with pytest.raises(ValueError) as error:
        joiner_of(backbone)
    assert str(error.value) == message


def test_a_backbone_returning_a_tensor_is_named_at_its_first_call():
    joiner = joiner_of({"_target_": "tests.custom_parts.ReturnsTensor"})
    with pytest.raises(
        ValueError,
        match=r"^backbone._target_='tests.custom_parts.ReturnsTensor' returned Tensor; it declares 3 feature maps",
    ):
        joiner(nested_tensor_from_tensor_list([torch.randn(3, 32, 32)]))


def test_dilation_and_a_missing_target_are_config_errors():
    with pytest.raises(
        ValueError, match=r"^dilation=true applies to our backbones; backbone._target_='tests.custom_parts"
    ):
        validated(compose_config(*SMALL, *OWN_PARTS, "dilation=true"))
    with pytest.raises(
        ValueError,
        match=r"^backbone._target_ is not set: give it on the command line \(backbone._target_=...\) or in your config$",
    ):
        validated(compose_config(*SMALL, "backbone=custom"))


# --- training with one's own parts, and what a checkpoint may build ----------------------------


@pytest.fixture(scope="module")
def own_parts_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("own_parts")
    steps = ["trainer.max_steps=3", "trainer.num_sanity_val_steps=0", "callbacks.lr_monitor=false", "logger.csv=false"]
    job = Job(validated(compose_config(*SMALL, *OWN_PARTS, *steps)), run_dir)
    groups = {group["name"]: len(group["params"]) for group in job.module.build_optimizer().param_groups}
    assert groups["backbone"] == 4  # stage2 and stage3: a weight and a bias each; the encoding has no parameters
    job.run()
    return run_dir / "checkpoints" / "last.ckpt"


def test_own_parts_train_save_plain_hyperparameters_and_reload_when_allowed(own_parts_checkpoint):
    content = torch.load(own_parts_checkpoint, weights_only=True)  # plain containers only
    saved = content["hyper_parameters"]["joiner"]
    assert saved["backbone"]["_target_"] == BACKBONE and saved["backbone"]["width"] == 8
    assert saved["position"] == {"_target_": ENCODING, "period": 5.0, "lr": None}
    module = load_training_module(own_parts_checkpoint, allowed_targets=[BACKBONE, ENCODING])
    reloaded = module.state_dict()
    assert reloaded.keys() == content["state_dict"].keys()
    assert all(torch.equal(reloaded[key], value) for key, value in content["state_dict"].items())
    assert isinstance(module.detector.backbone[0], DeclaredBackbone) and module.detector.backbone.strides == [8, 16]


def test_a_checkpoints_own_target_is_refused_unless_allowed(own_parts_checkpoint):
    with pytest.raises(TargetNotAllowedError) as error:
        load_detector(own_parts_checkpoint, allowed_targets=[ENCODING])
    assert str(error.value) == (
        f"checkpoint {own_parts_checkpoint} names backbone._target_='{BACKBONE}', which is not part of detr_backbone; "
        f"a saved config is not trusted to run code, so it is built only if you allow it: allowed_targets=[{BACKBONE}] "
        f"(Python: allowed_targets=['{BACKBONE}'])"
    )


@pytest.fixture(scope="module")
def os_system_checkpoint(own_parts_checkpoint, tmp_path_factory):
    """The trained checkpoint with its saved backbone replaced by a call of os.system."""
    folder = tmp_path_factory.mktemp("os_system")
    marker = folder / "ran"
    content = torch.load(own_parts_checkpoint, weights_only=True)
    content["hyper_parameters"]["joiner"]["backbone"] = {"_target_": "os.system", "command": f"touch {marker}"}
    path = folder / "evil.ckpt"
    torch.save(content, path)
    return path, marker


def test_a_saved_config_naming_os_system_never_runs(os_system_checkpoint):
    path, marker = os_system_checkpoint
    for load in (load_detector, load_training_module, DetrModule.load_from_checkpoint):
        with pytest.raises(
            TargetNotAllowedError, match=r"names backbone._target_='os.system', which is not part of detr_backbone"
        ):
            load(path)
    assert not marker.exists()


@pytest.mark.slow
def test_commands_refuse_it_in_one_line_and_take_the_allow_list(os_system_checkpoint, own_parts_checkpoint, tmp_path):
    path, marker = os_system_checkpoint
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, "-m", "detr_backbone", "export", f"output={tmp_path / 'model.onnx'}"]
    refused = subprocess.run(
        [*command, f"ckpt_path={path}"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert refused.returncode == 1 and not marker.exists() and not (tmp_path / "model.onnx").exists()
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: checkpoint {path} names backbone._target_='os.system'")
    )
    allowed = f"allowed_targets=[{BACKBONE},{ENCODING}]"  # the same command, in this process
    export_main(
        [f"ckpt_path={own_parts_checkpoint}", allowed, "format=torch_export", f"output={tmp_path / 'model.pt2'}"]
    )
    assert (tmp_path / "model.pt2").is_file()


def test_own_parts_train_in_bfloat16(tmp_path):
    run = Job(validated(compose_config(*SMALL, *OWN_PARTS, "precision=bf16-true", "trainer.fast_dev_run=1")), tmp_path)
    run.run()
    assert torch.isfinite(run.trainer.callback_metrics["train/loss"])
    assert run.module.detector.backbone[0].body.stage3[0].weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "saved, built",
    [
        ("detr_backbone.backbone.Backbone", "Backbone"),  # the module before the backbones moved into backbones/
        ("detr_backbone.backbone.GroupNormBackbone", "GroupNormBackbone"),
        ("detr_backbone.backbones.backbone.TimmBackbone", "TimmBackbone"),
        ("detr_backbone.Backbone", "Backbone"),
    ],
)
def test_targets_saved_under_a_moved_module_still_build_our_backbones(saved, built):
    import detr_backbone
    from detr_backbone.config import BACKBONE_TARGETS, own_kind
    from detr_backbone.targets import resolve

    assert resolve(saved, "backbone._target_") is getattr(detr_backbone, built)
    assert own_kind(saved, BACKBONE_TARGETS) == own_kind(f"detr_backbone.{built}", BACKBONE_TARGETS)
