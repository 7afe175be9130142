"""Joiner inference and training step: the reference layout against our plain path, defaults and fast paths."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import timm
import torch
from timm.utils.model import freeze_batch_norm_2d
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from detr_backbone import NestedTensor, build_backbone
from detr_backbone.compilation import compile_in_place

from .machine import peak_memory_mb, square_matmul
from .reference import ReferenceJoiner, detr_sine
from .timing import interleaved_medians

HIDDEN_DIM = 256
PEAK = "peak fp32 matmul"
PLAIN = {"channels_last": False, "fold_frozen_bn": False, "cache_size": 0}
SINGLE_FAST_PATHS = {
    "channels_last": {**PLAIN, "channels_last": True},
    "fold_frozen_bn": {**PLAIN, "fold_frozen_bn": True},
    "pos_cache": {**PLAIN, "cache_size": 32},
}


@dataclass(frozen=True)
class ModelSpec:
    """One backbone: how the reference builds it and how our config names it."""

    name: str
    backbone: dict = field(default_factory=dict)  # our BackboneConfig fields
    reference: dict = field(default_factory=dict)  # ReferenceJoiner / TimmReference arguments


MODELS = {
    "resnet50": ModelSpec("resnet50", {"kind": "torchvision", "name": "resnet50"}, {"name": "resnet50"}),
    "resnet101": ModelSpec("resnet101", {"kind": "torchvision", "name": "resnet101"}, {"name": "resnet101"}),
    "resnet50_dc5": ModelSpec(
        "resnet50_dc5",
        {"kind": "torchvision", "name": "resnet50", "dilation": True},
        {"name": "resnet50", "dilation": True},
    ),
    "resnet50_gn": ModelSpec(
        "resnet50_gn", {"kind": "groupnorm", "name": "resnet50"}, {"name": "resnet50", "group_norm": True}
    ),
    "convnext_tiny": ModelSpec(
        "convnext_tiny", {"kind": "timm", "name": "convnext_tiny"}, {"timm_name": "convnext_tiny"}
    ),
    "resnet18": ModelSpec("resnet18", {"kind": "torchvision", "name": "resnet18"}, {"name": "resnet18"}),  # --quick
}


class TimmReference(nn.Module):
    """A timm ``features_only`` model as timm builds it (NCHW, BatchNorm frozen by timm), with DETR's sine."""

    def __init__(self, timm_name: str, hidden_dim: int = HIDDEN_DIM):
        super().__init__()
        self.body = freeze_batch_norm_2d(timm.create_model(timm_name, features_only=True))
        # DETR's rule: the stages of the last three feature levels train, the rest is frozen
        trained = tuple(name.replace(".", "_", 1) for name in self.body.feature_info.module_name()[-3:])
        for name, parameter in self.body.named_parameters():
            parameter.requires_grad_(name.startswith(trained))
        self.hidden_dim = hidden_dim

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feature = self.body(images)[-1]
        feature_mask = torch.nn.functional.interpolate(mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
        return feature, feature_mask, detr_sine(feature_mask, self.hidden_dim // 2).to(feature.dtype)


def build_reference(spec: ModelSpec) -> nn.Module:
    options = dict(spec.reference)
    if "timm_name" in options:
        return TimmReference(options.pop("timm_name"))
    return ReferenceJoiner(**options, hidden_dim=HIDDEN_DIM)


def build_ours(spec: ModelSpec, fast_paths: dict | None) -> nn.Module:
    """Our Joiner; ``fast_paths=None`` keeps the config defaults."""
    backbone, position = dict(spec.backbone), {"kind": "sine"}
    if fast_paths is not None:
        position["cache_size"] = fast_paths["cache_size"]
        backbone.update({key: value for key, value in fast_paths.items() if key != "cache_size"})
    return build_backbone({"backbone": backbone, "position": position, "hidden_dim": HIDDEN_DIM, "lr_backbone": 1e-5})


def detr_batch(height: int, width: int, device: torch.device) -> NestedTensor:
    """Two images padded DETR's way: the second is 7/8 the size of the first, so the mask has padding."""
    images = torch.randn(2, 3, height, width, device=device)
    mask = torch.zeros(2, height, width, dtype=torch.bool, device=device)
    mask[1, height * 7 // 8 :, :] = True
    mask[1, :, width * 7 // 8 :] = True
    images[1][:, mask[1]] = 0
    return NestedTensor(images, mask)


def _inference(model: nn.Module, call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        model.eval()
        with torch.inference_mode():
            return call()

    return run


def _train_step(model: nn.Module, call: Callable[[], Tensor]) -> Callable[[], None]:
    def run() -> None:
        model.train()
        call().backward()
        for parameter in model.parameters():
            parameter.grad = None

    return run


def variant_calls(model: nn.Module, batch: NestedTensor, reference: bool) -> tuple[Callable, Callable]:
    """(inference, training step) of one variant; the training loss is the mean of the feature map."""
    if reference:
        forward = lambda: model(batch.tensors, batch.mask)  # noqa: E731
        loss = lambda: model(batch.tensors, batch.mask)[0].float().mean()  # noqa: E731
    else:
        forward = lambda: model(batch)  # noqa: E731
        loss = lambda: model(batch)[0][-1].tensors.float().mean()  # noqa: E731
    return _inference(model, forward), _train_step(model, loss)


def count_flops(call: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def build_variants(spec: ModelSpec, all_variants: bool, compile_variant: bool) -> dict[str, nn.Module]:
    """Our plain path and defaults; with ``all_variants`` each fast path alone; with ``compile_variant``
    the defaults under torch.compile."""
    configs: dict[str, dict | None] = {"plain": PLAIN, "default": None}
    if all_variants:
        configs.update(SINGLE_FAST_PATHS)
    models = {name: build_ours(spec, fast_paths) for name, fast_paths in configs.items()}
    if compile_variant:
        models["compiled"] = build_ours(spec, None)
        compile_in_place(models["compiled"])  # as backbone.compile does
    return models


def benchmark_model(
    spec: ModelSpec,
    size: Sequence[int],
    device: torch.device,
    repeats: int,
    warmup: int,
    all_variants: bool,
    compile_variant: bool,
    matmul_size: int,
    theoretical_gflops: float | None,
) -> list[dict]:
    """Rows for inference and for the training step of one model, every variant timed in the same rounds."""
    batch = detr_batch(*size, device)
    models = {"reference": build_reference(spec), **build_variants(spec, all_variants, compile_variant)}
    models = {name: model.to(device) for name, model in models.items()}
    calls = {name: variant_calls(model, batch, name == "reference") for name, model in models.items()}
    matmul, matmul_flops = square_matmul(device, matmul_size)
    rows = []
    for mode_index, mode in enumerate(("inference", "train")):
        mode_calls = {name: pair[mode_index] for name, pair in calls.items()}
        # the reference's work, and ours (every variant of ours does the plain path's FLOPs)
        flops = {"reference": count_flops(mode_calls["reference"]), "ours": count_flops(mode_calls["plain"])}
        # a matmul timed in the same rounds: the peak under the same machine load
        times = interleaved_medians({**mode_calls, PEAK: matmul}, repeats, warmup, device)
        round_peak = matmul_flops / times.pop(PEAK)["median_s"] / 1e9
        reference_s = times["reference"]["median_s"]
        variants = {}
        for name, timing in times.items():
            seconds = timing["median_s"]
            gflops = flops["reference" if name == "reference" else "ours"] / seconds / 1e9
            variants[name] = {
                **timing,
                "images_per_s": batch.tensors.shape[0] / seconds,
                "ratio_to_reference": reference_s / seconds,
                "gflops": gflops,
                "pct_of_measured_peak": 100 * gflops / round_peak,
                "pct_of_theoretical_peak": None if not theoretical_gflops else 100 * gflops / theoretical_gflops,
                "peak_memory_mb": peak_memory_mb(mode_calls[name], device),
            }
        rows.append(
            {
                "model": spec.name,
                "mode": mode,
                "batch": list(batch.tensors.shape),
                "gflop": flops["ours"] / 1e9,
                "reference_gflop": flops["reference"] / 1e9,
                "measured_peak_gflops": round_peak,
                "variants": variants,
            }
        )
    return rows
