"""Where torch.compile pays: compile time (the first step) and steady-state step time, eager against
compiled, for the default job's training step and for a DETR-sized detector (ResNet-50 Joiner + DETR head).

Compile times are cold (an empty inductor cache, as on a machine's first run) and warm (the same
graphs again once dynamo forgets them: the on-disk caches a second run of the same job finds).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

from detr_backbone.detection import DetrConfig
from detr_backbone.training.config import Config, OptimConfig
from detr_backbone.training.job import build_module
from detr_backbone.training.module import DetrModule

from .joiner import HIDDEN_DIM, detr_batch
from .loop import job_config, num_classes, plain_step, to_device, training_batches
from .machine import synchronize
from .timing import interleaved_medians

COCO_CLASSES = 91


def seconds(call: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def break_even_steps(compile_s: float, eager_s: float, compiled_s: float) -> float | None:
    """Steps after which the compiled run has caught up: compile time over the saving per step.
    None: it never catches up (compiled steps are no faster)."""
    saving = eager_s - compiled_s
    return compile_s / saving if saving > 0 else None


def compare(
    eager: Mapping[str, Callable[[], object]],
    compiled: Callable[[], object],
    repeats: int,
    warmup: int,
    device: torch.device,
) -> dict:
    """First calls (cold compile, then warm after dynamo forgets the graphs), then steady-state medians
    of the eager calls and the compiled one in interleaved rounds; ratios and break-even against each
    eager call. Compile time: what the first compiled call takes beyond a steady compiled step."""
    first_eager = seconds(next(iter(eager.values())), device)  # eager's own first-call costs, for reference
    with tempfile.TemporaryDirectory() as cache, temporary_cache_dir(cache):
        cold = seconds(compiled, device)
        times = interleaved_medians({**eager, "compiled": compiled}, repeats, warmup, device)
        torch._dynamo.reset()
        warm = seconds(compiled, device)
    compiled_s = times["compiled"]["median_s"]
    compile_s = {"cold_cache": cold - compiled_s, "warm_cache": warm - compiled_s}
    result = {
        "first_step_s": {"eager": first_eager, "compiled_cold_cache": cold, "compiled_warm_cache": warm},
        "compile_s": compile_s,
        "steady": times,
    }
    for name in eager:
        eager_s = times[name]["median_s"]
        result[f"vs_{name}"] = {
            "speedup": eager_s / compiled_s,
            "saving_s_per_step": eager_s - compiled_s,
            "break_even_steps_cold": break_even_steps(compile_s["cold_cache"], eager_s, compiled_s),
            "break_even_steps_warm": break_even_steps(compile_s["warm_cache"], eager_s, compiled_s),
        }
    return result


def training_call(module: DetrModule, batches: Sequence, clip_max_norm: float) -> Callable[[], None]:
    optimizer = module.build_optimizer()
    stream = itertools.cycle(batches)
    module.train()
    return lambda: plain_step(module, optimizer, next(stream), clip_max_norm)


def inference_call(module: DetrModule, batch) -> Callable[[], object]:
    def run() -> object:
        module.eval()
        with torch.inference_mode():
            return module(batch)

    return run


def default_job(overrides: Sequence[str], steps: int, repeats: int, warmup: int, device: torch.device) -> dict:
    """The default job's plain-loop training step: eager on its own batches and on the batches padded as
    compiling pads them (data.size_divisibility 0 -> 32), against the compiled detector (model.compile)."""
    cfg = job_config(overrides)
    compiled_cfg = job_config([*overrides, "model.compile=true"])
    padded = [to_device(batch, device) for batch in training_batches(compiled_cfg, steps)]
    unpadded = [to_device(batch, device) for batch in training_batches(cfg, steps)]
    classes = num_classes(cfg)
    pl.seed_everything(cfg.seed, verbose=False)
    eager = build_module(cfg, classes).to(device)
    compiled = build_module(compiled_cfg, classes).to(device)
    compiled.load_state_dict(eager.state_dict())
    eager_unpadded = copy.deepcopy(eager)
    calls = {
        "eager_padded": training_call(eager, padded, cfg.clip_max_norm),
        "eager_unpadded": training_call(eager_unpadded, unpadded, cfg.clip_max_norm),
    }
    result = compare(calls, training_call(compiled, padded, cfg.clip_max_norm), repeats, warmup, device)
    shapes = {tuple(images.tensors.shape) for images, _ in padded}
    return {
        "case": "default job, training step (plain loop), model.compile=true",
        "size_divisibility": {
            "eager_unpadded": cfg.data.size_divisibility,
            "padded": compiled_cfg.data.size_divisibility,
        },
        "padded_shapes": sorted(shapes),
        **result,
    }


def random_targets(
    batch_size: int, boxes: int, device: torch.device, num_classes: int = COCO_CLASSES
) -> list[dict[str, torch.Tensor]]:
    """``boxes`` random (cx, cy, w, h) boxes and labels per image, the same at every call."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.rand(batch_size, boxes, 2, generator=generator) * 0.6 + 0.2
    sides = torch.rand(batch_size, boxes, 2, generator=generator) * 0.3 + 0.05
    labels = torch.randint(0, num_classes, (batch_size, boxes), generator=generator)
    return [
        {"boxes": torch.cat((centre, side), dim=1).to(device), "labels": label.to(device)}
        for centre, side, label in zip(centres, sides, labels)
    ]


def detr_module(backbone: str, compile: bool, device: torch.device) -> DetrModule:
    """DETR as published around our Joiner with its defaults (6 + 6 layers, 100 queries, 91 classes)."""
    joiner = {"backbone": {"name": backbone}, "hidden_dim": HIDDEN_DIM, "lr_backbone": 1e-5}
    head = dataclasses.asdict(DetrConfig(compile=compile))
    return DetrModule(joiner, head, dataclasses.asdict(OptimConfig()), COCO_CLASSES).to(device)


def detr_sized(backbone: str, size: Sequence[int], repeats: int, warmup: int, device: torch.device) -> dict:
    """A DETR-sized detector on a fixed batch of two images (the joiner section's): training step and inference."""
    batch = detr_batch(*size, device)
    targets = random_targets(batch.tensors.shape[0], 4, device)
    clip_max_norm = Config().clip_max_norm
    torch.manual_seed(0)
    eager = detr_module(backbone, compile=False, device=device)
    compiled = detr_module(backbone, compile=True, device=device)
    compiled.load_state_dict(eager.state_dict())
    train = compare(
        {"eager": training_call(eager, [(batch, targets)], clip_max_norm)},
        training_call(compiled, [(batch, targets)], clip_max_norm),
        repeats,
        warmup,
        device,
    )
    inference = compare(
        {"eager": inference_call(eager, batch)}, inference_call(compiled, batch), repeats, warmup, device
    )
    return {
        "case": f"DETR ({backbone} Joiner, 6+6 layers, 100 queries), batch {list(batch.tensors.shape)}",
        "train": train,
        "inference": inference,
    }
