"""Resuming with a config that does not fit the checkpoint fails before anything is built, in one line that
names the keys; the keys that may change on resume (limits, hardware, data paths, batch size, logging) do."""

from __future__ import annotations

import re

import pytest
import torch

from detr_backbone.data import EpochShuffleSampler
from detr_backbone.data.resumable import ResumableDataLoader
from detr_backbone.training.job import Job, validated
from detr_backbone.training.resume import check_resume_classes

from .jobs import SMALL, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

# 8 images in batches of 2; the run stops at step 3, mid-epoch, and last.ckpt is written there
STOPPED_MID_EPOCH = (*SMALL, "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("run")
    Job(validated(compose_config(*STOPPED_MID_EPOCH)), run_dir).run()
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("# what Hydra saves in every run folder\n")
    torch.set_num_threads(threads)
    return run_dir / "checkpoints" / "last.ckpt"


def mismatch(*overrides: str) -> str:
    with pytest.raises(ValueError) as error:
        validated(compose_config(*SMALL, *overrides))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_another_backbone_names_the_keys_the_run_config_and_init_from(checkpoint):
    message = mismatch("backbone=resnet18", f"ckpt_path={checkpoint}")
    assert message == (
        f"ckpt_path='{checkpoint}' was trained with another config (backbone._target_: detr_backbone.GroupNormBackbone "
        "in the checkpoint, detr_backbone.Backbone now; backbone.main_layer: -3 in the checkpoint, -1 now; "
        f"backbone.trainable_layers: 5 in the checkpoint, null now); its run's config is {checkpoint.parent.parent / '.hydra' / 'config.yaml'}. To start a "
        f"new run from these weights with another model, use init_from={checkpoint} instead of ckpt_path"
    )


def test_optimizer_and_data_order_keys_must_match_too(checkpoint):
    message = mismatch("lr=0.001", "seed=7", "data.train_size=10", f"ckpt_path={checkpoint}")
    assert re.search(
        r"\(data\.train_size: 8 in the checkpoint, 10 now; lr: 0\.0002 in the checkpoint, 0\.001 now; "
        r"seed: 42 in the checkpoint, 7 now\)",
        message,
    ), message


def test_a_checkpoint_without_the_saved_config_is_checked_on_its_model_hyperparameters(checkpoint, tmp_path):
    content = torch.load(checkpoint, weights_only=True)
    del content["config"]
    older = tmp_path / "older.ckpt"
    torch.save(content, older)
    message = mismatch("backbone=resnet18", "hidden_dim=64", f"ckpt_path={older}")
    assert message.startswith(f"ckpt_path='{older}' was trained with another config (backbone.")
    assert "backbone._target_: detr_backbone.GroupNormBackbone in the checkpoint, detr_backbone.Backbone now" in message
    assert "hidden_dim: 32 in the checkpoint, 64 now" in message
    assert "resume with the config of the run that wrote it" in message  # no run folder around this file


def test_keys_that_may_change_on_resume_do(checkpoint, tmp_path):
    allowed = (
        "trainer.max_epochs=2",
        "trainer.max_steps=-1",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=5",
        "data.batch_size=4",
        "data.num_workers=0",
        "logger.csv=false",
        "callbacks.checkpoint.every_n_train_steps=null",
        "callbacks.lr_monitor=false",
        "backbone.compile=false",
        "test_after_fit=false",
    )
    job = Job(validated(compose_config(*SMALL, *allowed, f"ckpt_path={checkpoint}")), tmp_path)
    job.run()  # mid-epoch, in batches of 4 now: the loader skips the 6 samples trained on, in whole batches
    assert job.trainer.current_epoch == 2 and job.trainer.global_step > 3


def test_loader_resumed_with_another_batch_size_skips_the_samples_already_handed_out():
    dataset = list(range(12))
    sampler = EpochShuffleSampler(dataset, seed=1)
    full = [index for batch in ResumableDataLoader(dataset, batch_size=2, sampler=sampler) for index in batch.tolist()]
    interrupted = iter(before := ResumableDataLoader(dataset, batch_size=2, sampler=sampler))
    for _ in range(3):
        next(interrupted)
    after = ResumableDataLoader(dataset, batch_size=3, sampler=sampler)
    after.load_state_dict(before.state_dict())
    assert [index for batch in after for index in batch.tolist()] == full[6:]


def test_data_of_other_classes_fails_before_the_model_is_built(checkpoint):
    """A COCO folder may move (data paths may change), but its categories must be the checkpoint's."""
    with pytest.raises(ValueError) as error:
        check_resume_classes(checkpoint, ["cat", "dog"])
    assert str(error.value) == (
        f"ckpt_path='{checkpoint}' was trained on the classes ['rectangle', 'ellipse', 'triangle'], the data has "
        f"['cat', 'dog']; resume with the run's data, or start a new run from these weights with init_from={checkpoint} "
        "instead of ckpt_path (it carries class rows over by name)"
    )
    check_resume_classes(checkpoint, ["rectangle", "ellipse", "triangle"])
