"""Heads as plugins: checkpoints written before the move load and give their outputs, a loaded checkpoint's
config is typed once, and a head of a user's own trains, reloads and predicts with one registration line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from detr_backbone import JoinerConfig, nested_tensor_from_tensor_list
from detr_backbone.data import build_datamodule
from detr_backbone.detection import DETR, HEADS, head_config
from detr_backbone.detection.deformable import DeformableDETR
from detr_backbone.inference import Predictor, load_detector
from detr_backbone.training import DetrModule, Job, load_training_module, validated

from .custom_head import POOLED, TARGET, PooledDetector, PooledHeadConfig
from .jobs import SMALL, compose_config

DATA = Path(__file__).parent / "data"
TINY_BACKBONE = "tests.custom_parts.make_tiny_backbone"
# the overrides the v0.1 files were trained with (2 steps): SMALL with the tiny backbone of custom_parts
V01_RUN = [
    *SMALL,
    "backbone=custom",
    f"backbone._target_={TINY_BACKBONE}",
    "+backbone.width=8",
    "backbone.levels=[2,3]",
    "hidden_dim=32",
    "model.num_queries=5",
    "model.dim_feedforward=64",
    "trainer.num_sanity_val_steps=0",
    "callbacks.lr_monitor=false",
    "logger.csv=false",
    "data.train_size=4",
    "data.val_size=2",
]


class StepRecorder(pl.Callback):
    def __init__(self):
        self.started: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        self.started.append(trainer.global_step)


def outputs_of(detector: torch.nn.Module, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return detector.eval()(nested_tensor_from_tensor_list(images))


@pytest.mark.parametrize("name, detector_class", [("detr", DETR), ("deformable_detr", DeformableDETR)])
def test_checkpoints_written_before_the_move_load_in_every_loader_with_their_outputs(name, detector_class):
    """The files were written by the package before heads became plugins, with the outputs it computed then."""
    path = DATA / f"{name}_head_v0.1.ckpt"
    expected = torch.load(DATA / f"{name}_head_v0.1_outputs.pt", weights_only=True)
    saved = torch.load(path, weights_only=True)["state_dict"]
    loaded = load_detector(path, allowed_targets=[TINY_BACKBONE])
    assert type(loaded.detector) is detector_class and loaded.class_names == expected["class_names"]
    module = load_training_module(path, allowed_targets=[TINY_BACKBONE])
    lightning = DetrModule.load_from_checkpoint(path, allowed_targets=[TINY_BACKBONE], weights_only=True)
    for detector in (loaded.detector, module.detector, lightning.detector):
        state = detector.state_dict()
        detector_keys = {key.removeprefix("detector.") for key in saved if key.startswith("detector.")}
        assert state.keys() == detector_keys
        assert all(torch.equal(state[key], saved[f"detector.{key}"]) for key in state)
        outputs = outputs_of(detector, expected["images"])
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(outputs[key], expected[key], rtol=0, atol=1e-6)
        sizes = torch.tensor([[40, 48], [32, 44]])
        for got, key in zip(detector.detections(outputs, sizes), ("scores", "labels", "boxes")):
            torch.testing.assert_close(got, expected[key], rtol=0, atol=1e-5)


def test_a_checkpoint_written_before_the_move_resumes(tmp_path):
    """ckpt_path: the run goes on from the file's step 2 to step 4, its config checked against the file's."""
    path = DATA / "detr_head_v0.1.ckpt"
    overrides = ["model=detr_small", "trainer.max_steps=4", "trainer.max_epochs=4", f"ckpt_path={path}"]
    job = Job(validated(compose_config(*V01_RUN, *overrides)), tmp_path)
    steps = StepRecorder()
    job.trainer.callbacks.append(steps)
    job.run()
    assert steps.started == [2, 3] and job.trainer.global_step == 4


def test_a_loaded_checkpoint_is_typed_once(monkeypatch):
    """load_detector converts the saved Joiner config from plain values once (it was four times)."""
    original = JoinerConfig.from_args.__func__
    conversions = []

    def counted(cls, args):
        if not isinstance(args, JoinerConfig):
            conversions.append(args)
        return original(cls, args)

    monkeypatch.setattr(JoinerConfig, "from_args", classmethod(counted))
    load_detector(DATA / "detr_head_v0.1.ckpt", allowed_targets=[TINY_BACKBONE])
    assert len(conversions) == 1
    load_training_module(DATA / "deformable_detr_head_v0.1.ckpt", allowed_targets=[TINY_BACKBONE])
    assert len(conversions) == 2


@pytest.mark.slow
def test_a_head_of_ones_own_trains_reloads_and_predicts_with_one_registry_record(monkeypatch, tmp_path):
    monkeypatch.setitem(HEADS, "pooled", POOLED)  # the one record a new head adds to the registry
    cfg = validated(compose_config(*V01_RUN, "model=detr_small", "trainer.max_steps=4"))
    head = {"_target_": TARGET, "num_queries": 4}
    assert head_config(head) == PooledHeadConfig(num_queries=4)
    joiner = {"backbone": cfg.backbone, "position": cfg.position, "hidden_dim": 32, "lr_backbone": 1e-5}
    optim = {"lr": 1e-3, "weight_decay": 1e-4, "lr_drop": 200}
    names = ["rectangle", "ellipse", "triangle"]
    module = DetrModule(joiner, head, optim, 3, names, allowed_targets=[TARGET, TINY_BACKBONE])
    assert isinstance(module.detector, PooledDetector)
    assert module.detector.backbone.strides == [8, 16]  # the config's levels; the head reads the deepest
    groups = {group["name"]: group for group in module.build_optimizer().param_groups}
    assert set(groups) == {"head", "backbone", "class"}  # the sine encoding has no parameters
    assert groups["class"]["lr"] == pytest.approx(5e-4)
    assert [p.shape for p in groups["class"]["params"]] == [(4, 32), (4,)]
    classes = {id(p) for p in module.detector.class_embed.parameters()}
    assert not classes & {id(p) for p in groups["head"]["params"]}

    before = {key: value.clone() for key, value in module.detector.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    trainer.fit(module, datamodule=build_datamodule(cfg.data))
    assert not torch.equal(before["class_embed.weight"], module.detector.class_embed.weight)
    assert trainer.callback_metrics["val/map_50"] >= 0  # evaluated through the head's own detections
    path = tmp_path / "pooled.ckpt"
    trainer.save_checkpoint(path)

    loaded = load_detector(path, allowed_targets=[TARGET, TINY_BACKBONE])
    assert isinstance(loaded.detector, PooledDetector) and loaded.class_names == names
    images = [torch.randn(3, 40, 48), torch.randn(3, 36, 40)]
    torch.testing.assert_close(outputs_of(loaded.detector, images), outputs_of(module.detector, images))
    predictor = Predictor.from_loaded(loaded, threshold=0.0)
    found = predictor(torch.rand(3, 40, 48))
    assert len(found) == 4 and set(found.names) <= set(names)  # every query, with its best real class


def test_init_from_is_refused_for_a_head_that_describes_no_weights(monkeypatch):
    monkeypatch.setitem(HEADS, "pooled", POOLED)
    cfg = replace(validated(compose_config(*V01_RUN, "model=detr_small")), model=PooledHeadConfig(), init_from="x.pth")
    with pytest.raises(ValueError) as error:
        validated(cfg)
    assert str(error.value) == (
        f"init_from='x.pth': model._target_='{TARGET}' is a head that reads no published weights yet; "
        "heads that do: detr, deformable_detr, dino, rtdetrv2, dfine (model=<name>)"
    )


def test_every_head_record_ties_its_schema_builder_and_presets():
    """Each record's builder is what its schema's ``_target_`` names, its presets are exactly the conf/model/ files
    that extend its schema, and the heads that read published weights describe them with their own class."""
    from detr_backbone.targets import resolve

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    presets = {path.stem: yaml.safe_load(path.read_text()) for path in conf.glob("*.yaml")}

    def schema_of(preset: str) -> str:
        parents = presets[preset]["defaults"]
        own = next(entry for entry in parents if entry != "_self_")
        return own.removeprefix("/schema/").removesuffix("@_here_") if own.startswith("/schema/") else schema_of(own)

    for name, record in HEADS.items():
        assert record.name == name
        assert resolve(record.schema._target_, "model._target_") is record.builder
        assert sorted(record.presets) == sorted(preset for preset in presets if schema_of(preset) == name)
        if record.architecture is not None:
            assert name == record.architecture.HEAD
    assert sorted(preset for record in HEADS.values() for preset in record.presets) == sorted(presets)


def test_a_builder_that_disagrees_with_its_schema_fails_at_registration():
    """A builder parameter no field gives, or a field no parameter takes, is an error, not a value silently dropped."""
    from detr_backbone.detection import DetrConfig, HeadRecord, build_detr
    from detr_backbone.detection.detr.criterion import detr_criterion

    def misspelt(*, backbone, num_classes, hidden_dim, num_queries, enc_layers, dec_layers, nheads, dim_feedforward,
                 dropout, prenorm, aux_loss):  # fmt: skip
        return build_detr(**locals())

    with pytest.raises(TypeError) as error:
        HeadRecord("detr", DetrConfig, misspelt, detr_criterion, presets=("detr",))
    assert "fields the builder does not take: ['pre_norm']; parameters no field gives: ['prenorm']" in str(error.value)
    assert HeadRecord("detr", DetrConfig, build_detr, detr_criterion, presets=("detr",)).builder is build_detr
