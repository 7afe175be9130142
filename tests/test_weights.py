"""Weights: DETR's checkpoint layout, checkpoint files of every supported layout, strictness,
unreadable or malicious files, and pretrained downloads that fail with a useful message offline.

Every weight file is written by the tests themselves into tmp_path; nothing touches the network.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.error

import huggingface_hub.constants
import pytest
import timm.models._hub
import torch
import torch.hub
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detr_backbone import (
    CheckpointMismatchError,
    LoadReport,
    TimmBackbone,
    build_backbone,
    load_checkpoint,
    nested_tensor_from_tensor_list,
    read_state_dict,
)

# Tensors of a DETR detector that are not the backbone's: a loader must leave them alone.
DETECTOR_HEAD = {
    "transformer.encoder.layers.0.linear1.weight": torch.randn(2048, 256),
    "class_embed.weight": torch.randn(92, 256),
    "query_embed.weight": torch.randn(100, 256),
}


def config(name="resnet18", position="sine", **backbone):
    return {"backbone": {"name": name, **backbone}, "position": {"kind": position}, "lr_backbone": 1e-5}


def perturb_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Move every float tensor (FrozenBN statistics included) away from its init, so that a
    loader that forgets some tensors, buffers in particular, changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():  # detached views: in-place edits stick
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.count_nonzero() == 0:  # biases and means start at zero
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
            else:  # relative noise keeps activations finite through 50 layers
                tensor.mul_(1 + 0.1 * torch.randn(tensor.shape, generator=generator))
    return module


def detr_state(joiner: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A DETR detector's state dict around ``joiner`` (``detr.backbone = joiner``)."""
    state = {f"backbone.0.body.{key}": value for key, value in joiner[0].body.state_dict().items()}
    state |= {f"backbone.1.{key}": value for key, value in joiner[1].state_dict().items()}
    state |= DETECTOR_HEAD
    return {prefix + key: value for key, value in state.items()}


def samples():
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 64, 96, generator=generator), torch.randn(3, 48, 80, generator=generator)]
    return nested_tensor_from_tensor_list(images)  # the second image is padded


def outputs(joiner: nn.Module) -> list[torch.Tensor]:
    joiner.eval()
    with torch.no_grad():
        features, positions = joiner(samples())
    return [f.tensors for f in features] + [f.mask for f in features] + positions


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --- checkpoint layout -------------------------------------------------------------------------


def test_resnet50_state_dict_has_detr_checkpoint_layout():
    joiner = build_backbone({"backbone": {"kind": "torchvision", "name": "resnet50"}, "lr_backbone": 1e-5})
    keys = list(joiner.state_dict())
    body = [key for key in keys if key.startswith("0.body.")]
    # DETR's official R50 checkpoint holds 265 tensors under backbone.0.body.; sine owns nothing.
    assert len(body) == 265
    assert len(keys) == 265
    assert not [key for key in body if "num_batches_tracked" in key or ".fc." in key or key.startswith("0.body.fc")]
    reference = torchvision.models.resnet50(weights=None).state_dict()
    expected = {k for k in reference if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert {key.removeprefix("0.body.") for key in body} == expected


def test_frozen_batchnorm_statistics_are_buffers_not_parameters():
    joiner = build_backbone(config("resnet50"))
    norms = [m for m in joiner.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(norms) == 53  # bn1 + 3 per bottleneck (16) + 4 downsample norms
    assert not [m for m in joiner.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        assert dict(norm.named_parameters(recurse=False)) == {}
        assert {name for name, _ in norm.named_buffers(recurse=False)} == {
            "weight",
            "bias",
            "running_mean",
            "running_var",
        }
    # Only convolutions remain as parameters of the body.
    assert all(
        name.endswith("weight") and ("conv" in name or "downsample.0" in name) for name, _ in joiner.named_parameters()
    )


# --- DETR / Lightning detector checkpoints -------------------------------------------------------


def test_detr_checkpoint_reproduces_source_outputs_resnet18(tmp_path):
    source = perturb_(build_backbone(config()))
    path = tmp_path / "detr_r18.pth"
    torch.save({"model": detr_state(source), "epoch": 499}, path)

    joiner = build_backbone(config())
    fresh = outputs(joiner)
    report = load_checkpoint(joiner, path)

    assert isinstance(report, LoadReport) and report.ok
    assert report.loaded == len(source[0].body.state_dict()) == 100
    assert identical(outputs(joiner), outputs(source))
    assert not identical(fresh, outputs(source))  # the load is what made them equal


@pytest.mark.slow
def test_detr_checkpoint_reproduces_source_outputs_resnet50_via_config(tmp_path):
    source = perturb_(build_backbone(config("resnet50")))
    path = tmp_path / "detr_r50.pth"
    torch.save({"model": detr_state(source)}, path)

    loaded = build_backbone(config("resnet50", checkpoint=str(path)))
    fresh = build_backbone(config("resnet50"))

    reference = outputs(source)
    assert identical(outputs(loaded), reference)
    assert not identical(outputs(fresh), reference)


def test_detr_checkpoint_fills_learned_position_table(tmp_path):
    source = perturb_(build_backbone(config(position="learned")))
    path = tmp_path / "detr_learned.pth"
    state = detr_state(source)
    assert {"backbone.1.row_embed.weight", "backbone.1.col_embed.weight"} <= state.keys()
    torch.save({"model": state}, path)

    joiner = build_backbone(config(position="learned", checkpoint=str(path)))

    assert torch.equal(joiner[1].row_embed.weight, source[1].row_embed.weight)
    assert torch.equal(joiner[1].col_embed.weight, source[1].col_embed.weight)
    assert identical(outputs(joiner), outputs(source))


def test_learned_joiner_refuses_detr_checkpoint_without_table(tmp_path):
    path = tmp_path / "detr_sine.pth"
    torch.save({"model": detr_state(build_backbone(config()))}, path)  # a sine DETR: no table
    joiner = build_backbone(config(position="learned"))
    with pytest.raises(CheckpointMismatchError, match=r"backbone\.1\.row_embed\.weight") as info:
        load_checkpoint(joiner, path)
    assert "backbone.1.col_embed.weight" in str(info.value)
    with pytest.raises(CheckpointMismatchError, match=r"backbone\.1\.row_embed\.weight"):
        build_backbone(config(position="learned", checkpoint=str(path)))


def test_sine_joiner_refuses_detr_checkpoint_with_table(tmp_path):
    path = tmp_path / "detr_learned.pth"
    torch.save({"model": detr_state(build_backbone(config(position="learned")))}, path)
    with pytest.raises(CheckpointMismatchError, match=r"backbone\.1\.row_embed\.weight"):
        load_checkpoint(build_backbone(config()), path)


def test_lightning_checkpoint_of_a_detector_loads(tmp_path):
    source = perturb_(build_backbone(config(position="learned")), seed=3)
    path = tmp_path / "epoch=3-step=120.ckpt"
    torch.save(
        {
            "state_dict": detr_state(source, prefix="detector."),
            "epoch": 3,
            "global_step": 120,
            "hyper_parameters": {"lr": 1e-4, "backbone": {"name": "resnet18"}},
        },
        path,
    )
    joiner = build_backbone(config(position="learned"))
    assert load_checkpoint(joiner, path).ok
    assert identical(outputs(joiner), outputs(source))


# --- ImageNet and GroupNorm checkpoints ----------------------------------------------------------


def test_torchvision_imagenet_state_dict_loads_into_frozen_bn(tmp_path):
    state = perturb_(torchvision.models.resnet18(weights=None), seed=5).state_dict()
    assert "fc.weight" in state and "layer1.0.bn1.num_batches_tracked" in state
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(state, path)

    joiner = build_backbone(config())
    report = load_checkpoint(joiner, path)

    assert report.ok and report.loaded == 100
    assert sorted(report.skipped) == ["body.fc.bias", "body.fc.weight"]
    body = joiner[0].body
    assert torch.equal(body.layer1[0].bn1.running_var, state["layer1.0.bn1.running_var"])
    assert torch.equal(body.layer2[0].downsample[1].running_mean, state["layer2.0.downsample.1.running_mean"])
    assert torch.equal(body.conv1.weight, state["conv1.weight"])


@pytest.fixture(scope="module")
def groupnorm_resnet50_state():
    resnet = torchvision.models.resnet50(weights=None, norm_layer=lambda channels: nn.GroupNorm(32, channels))
    return perturb_(resnet, seed=7).state_dict()


@pytest.mark.parametrize("prefixed", ["all", "none", "some"])
def test_groupnorm_checkpoint_with_or_without_ddp_prefix(tmp_path, groupnorm_resnet50_state, prefixed):
    state = groupnorm_resnet50_state
    carries = {"all": lambda i: True, "none": lambda i: False, "some": lambda i: i % 2 == 0}[prefixed]
    saved = {("module." if carries(i) else "") + key: value for i, (key, value) in enumerate(state.items())}
    path = tmp_path / "resnet50_gn.pth"
    torch.save({"model": saved, "epoch": 90}, path)

    joiner = build_backbone(config("resnet50", kind="groupnorm", checkpoint=str(path)))

    body = joiner[0].body
    assert isinstance(body.bn1, nn.GroupNorm) and body.bn1.num_groups == 32
    loaded = body.state_dict()
    assert loaded.keys() == {key for key in state if not key.startswith("fc.")}
    assert all(torch.equal(loaded[key], state[key]) for key in loaded)


def test_ddp_prefix_is_stripped_only_at_the_start(tmp_path):
    # MDETR strips k[7:] unconditionally; a key without the prefix must stay whole, and a
    # "module." inside a key is part of its name.
    path = tmp_path / "mixed.pth"
    torch.save(
        {
            "model": {
                "module.conv1.weight": torch.ones(1),
                "bn1.weight": torch.ones(1),
                "layer1.module.weight": torch.ones(1),
            }
        },
        path,
    )
    assert set(read_state_dict(path)) == {"conv1.weight", "bn1.weight", "layer1.module.weight"}


# --- strictness ---------------------------------------------------------------------------------


def test_missing_body_tensor_is_an_error_naming_it(tmp_path):
    state = detr_state(build_backbone(config()))
    del state["backbone.0.body.layer2.0.bn1.running_var"]
    path = tmp_path / "missing.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing.*backbone\.0\.body\.layer2\.0\.bn1\.running_var"):
        load_checkpoint(build_backbone(config()), path)


def test_extra_key_under_an_existing_module_is_an_error_naming_it(tmp_path):
    state = dict(build_backbone(config())[0].body.state_dict())
    state["layer1.0.conv9.weight"] = torch.zeros(64, 64, 3, 3)
    state["head.weight"] = torch.zeros(3)  # a module the body lacks: skipped, not an error
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected.*layer1\.0\.conv9\.weight") as info:
        load_checkpoint(build_backbone(config()), path)
    assert "head.weight" not in str(info.value).split("unexpected in the checkpoint")[1]


def test_non_strict_load_warns_and_reports_what_did_not_fit(tmp_path):
    source = perturb_(build_backbone(config()))
    state = dict(source[0].body.state_dict())
    del state["layer4.1.conv2.weight"]
    state["layer1.0.conv9.weight"] = torch.zeros(64, 64, 3, 3)
    path = tmp_path / "loose.pth"
    torch.save(state, path)

    joiner = build_backbone(config())
    with pytest.warns(UserWarning, match="non-strict"):
        report = load_checkpoint(joiner, path, strict=False)
    assert not report.ok
    assert report.missing == ["body.layer4.1.conv2.weight"]
    assert report.unexpected == ["body.layer1.0.conv9.weight"]
    assert report.loaded == 99
    assert torch.equal(joiner[0].body.conv1.weight, source[0].body.conv1.weight)  # the rest did load

    # The same through the config: backbone.strict=false.
    with pytest.warns(UserWarning, match=r"layer4\.1\.conv2\.weight"):
        joiner = build_backbone(config(checkpoint=str(path), strict=False))
    assert torch.equal(joiner[0].body.layer3[0].bn2.running_var, source[0].body.layer3[0].bn2.running_var)


def test_resnet101_checkpoint_does_not_load_into_resnet50(tmp_path):
    # Same tensor shapes where both have a block, so only the key check can catch it.
    path = tmp_path / "resnet101.pth"
    torch.save(torchvision.models.resnet101(weights=None).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected in the checkpoint: body\.layer3\.6\.") as info:
        build_backbone(config("resnet50", checkpoint=str(path)))
    assert str(path) in str(info.value)


def test_wrong_tensor_shape_is_a_clear_error_with_the_path(tmp_path):
    state = dict(build_backbone(config())[0].body.state_dict())
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    path = tmp_path / "wrong_shape.pth"
    torch.save(state, path)
    joiner = build_backbone(config())
    before = {key: value.clone() for key, value in joiner.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"body\.conv1\.weight has shape \(64, 3, 5, 5\)") as info:
        load_checkpoint(joiner, path)
    assert str(path) in str(info.value) and "(64, 3, 7, 7) in the model" in str(info.value)
    # keys are matched before anything is copied: a failed load leaves the joiner untouched
    assert all(torch.equal(before[key], value) for key, value in joiner.state_dict().items())


# --- files that cannot or must not be read ---------------------------------------------------------


def test_nonexistent_file_is_named(tmp_path):
    path = tmp_path / "nowhere" / "detr-r50.pth"
    with pytest.raises(FileNotFoundError, match="detr-r50.pth"):
        load_checkpoint(build_backbone(config()), path)
    with pytest.raises(FileNotFoundError, match=str(path)):
        build_backbone(config(checkpoint=str(path)))


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file_is_reported_as_corrupt(tmp_path, keep):
    path = tmp_path / "detr.pth"
    torch.save({"model": detr_state(build_backbone(config()))}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated|corrupt") as info:
        load_checkpoint(build_backbone(config()), path)
    assert str(path) in str(info.value)


def test_empty_file_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "interrupted_copy.pth"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated|corrupt"):
        read_state_dict(path)


def test_file_without_tensors_is_refused(tmp_path):
    path = tmp_path / "not_weights.pth"
    torch.save({"model": {"lr": 1e-4}}, path)
    with pytest.raises(ValueError, match="no state dict of tensors"):
        read_state_dict(path)


class WritesMarker:
    """Unpickling this object opens (creates) ``marker`` for writing: a stand-in for any code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclasses.dataclass
class TrainingArgs:
    lr: float = 1e-4


@pytest.mark.parametrize("payload", ["reduce", "dataclass"])
def test_pickled_objects_are_refused_and_never_run(tmp_path, payload):
    marker = tmp_path / "pwned"
    extra = WritesMarker(str(marker)) if payload == "reduce" else TrainingArgs()
    path = tmp_path / "evil.pth"
    torch.save({"model": build_backbone(config())[0].body.state_dict(), "args": extra}, path)

    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(build_backbone(config()), path)
    assert not marker.exists()

    if payload == "reduce":  # control: unrestricted torch.load (the reference's) does run it
        torch.load(path, weights_only=False)["args"].close()
        assert marker.exists()


# --- pretrained weights without network ------------------------------------------------------------


def no_network(calls):
    def download(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network")

    return download


def test_torchvision_pretrained_loads_from_filled_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network(calls))
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"].fill_(0.5)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / os.path.basename(url))

    # check_hash=True is only applied to a fresh download, so the cached file is used as is.
    joiner = build_backbone(config(pretrained=True))

    assert calls == []
    assert torch.all(joiner[0].body.conv1.weight == 0.5)


def test_torchvision_pretrained_offline_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network(calls))
    with pytest.raises(RuntimeError, match="pretrained=false") as info:
        build_backbone(config(pretrained=True))
    assert calls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    message = str(info.value)
    assert "backbone.checkpoint" in message and "resnet18" in message and "no network" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_timm_pretrained_offline_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network([]))
    repos = []

    def hub_download(*args, **kwargs):
        repos.append(kwargs.get("repo_id", args[0] if args else None))
        raise OSError("no network")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", hub_download)
    with pytest.raises(RuntimeError, match="pretrained=false") as info:
        TimmBackbone("resnet18", pretrained=True)
    assert repos and repos[0].startswith("timm/resnet18")  # it did go through the (patched) hub
    assert "backbone.checkpoint" in str(info.value) and "timm" in str(info.value)


def test_groupnorm_pretrained_points_to_checkpoint():
    with pytest.raises(ValueError, match="backbone.checkpoint"):
        build_backbone(config("resnet50", kind="groupnorm", pretrained=True))


def test_a_joiners_own_state_dict_loads_back(tmp_path):
    source = perturb_(build_backbone(config(position="learned")), seed=5)
    path = tmp_path / "joiner.pth"
    torch.save(source.state_dict(), path)
    joiner = build_backbone(config(position="learned"))
    report = load_checkpoint(joiner, path)
    assert report.ok and report.loaded == len(source.state_dict())
    assert all(torch.equal(value, joiner.state_dict()[key]) for key, value in source.state_dict().items())


def test_detector_keys_outside_the_joiner_are_counted_as_skipped(tmp_path):
    path = tmp_path / "detr.pth"
    torch.save({"model": detr_state(build_backbone(config()))}, path)
    report = load_checkpoint(build_backbone(config()), path)
    assert sorted(report.skipped) == sorted(DETECTOR_HEAD)
