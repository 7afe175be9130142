"""Deformable attention's core, measured: each implementation against the grid_sample reference and
Hugging Face's core, alone and inside Deformable DETR.

Sections (``--sections``, all by default):

- ``core``: the core alone at the encoder of an 800x1066 image (strides 8-64, every position a
  query, 8 heads of 32 channels, 4 points), forward and forward + backward;
- ``forward``: Deformable DETR R50 (300 queries, 6 + 6 layers) on one 800x1066 image, inference;
- ``train``: its training step (loss, backward, AdamW) on a batch of two at 480x640, the second
  image 7/8 the size and padded, and the memory that step adds at its peak;
- ``job``: the Deformable shapes job's training step (``python train.py experiment=shapes_deformable``).

Variants of a section run once per round, rounds interleaved (one warm-up round), medians
reported; ratios are against Hugging Face's model (or core) where it takes part, else against
the reference core. Both models start from random weights (timm's ResNet-50 for Hugging Face's).

    python -m benchmarks.deformable_attention [--repeats 5] [--sections core,forward,train,job]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import platform
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch

from detr_backbone import nested_tensor_from_tensor_list
from detr_backbone.detection.multiscale.sampling import multi_scale_deformable_attention

from .loop import job_config, num_classes, plain_step, to_device, training_batches
from .machine import cpu_model_name, peak_memory_mb
from .timing import interleaved_medians

CPU = torch.device("cpu")
CORES = ("grid_sample", "gather")
R50 = ["backbone=resnet50", "backbone.pretrained=false", "model=deformable_detr", "hidden_dim=256"]
COCO_CLASSES = 91
STRIDES = (8, 16, 32, 64)


def core_inputs(height: int, width: int, heads: int = 8, channels: int = 32, points: int = 4):
    """Encoder-sized inputs: a query at every position, its points within a few pixels of it."""
    shapes = [(-(-height // s), -(-width // s)) for s in STRIDES]
    length = sum(h * w for h, w in shapes)
    value = torch.randn(1, length, heads, channels)
    centres = torch.rand(1, length, 1, 1, 1, 2)
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)[:, None, :]
    offsets = torch.randn(1, length, heads, len(shapes), points, 2) * 2 / sizes
    locations = centres + offsets
    weights = torch.rand(1, length, heads, len(shapes) * points).softmax(-1).view(1, length, heads, len(shapes), points)
    return value, shapes, locations, weights


def hugging_face_core(value, shapes, locations, weights):
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    core = MultiScaleDeformableAttention()
    shape_tensor = torch.tensor(shapes)
    starts = torch.cat([shape_tensor.new_zeros(1), shape_tensor.prod(1).cumsum(0)[:-1]])
    return core(value, shape_tensor, shapes, starts, locations, weights, 64)


def core_section(args) -> dict:
    value, shapes, locations, weights = core_inputs(*args.size)
    variants: dict[str, Callable] = {
        name: functools.partial(multi_scale_deformable_attention, impl=name) for name in CORES
    }
    variants["hugging_face"] = hugging_face_core
    outputs = {name: core(value, shapes, locations, weights) for name, core in variants.items()}
    difference = max((outputs[name] - outputs["grid_sample"]).abs().max().item() for name in outputs)

    def forward(core):
        with torch.no_grad():
            return lambda: core(value, shapes, locations, weights)

    def forward_backward(core):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        upstream = torch.randn(outputs["grid_sample"].shape)
        return lambda: core(inputs[0], shapes, inputs[1], inputs[2]).backward(upstream)

    return {
        "queries": value.shape[1],
        "max_difference_to_reference": difference,
        "forward": interleaved_medians({n: forward(c) for n, c in variants.items()}, args.repeats, 1, CPU),
        "forward_backward": interleaved_medians(
            {n: forward_backward(c) for n, c in variants.items()}, args.repeats, 1, CPU
        ),
    }


def our_r50(impl: str):
    pl.seed_everything(0, verbose=False)
    from detr_backbone.training.job import build_module

    return build_module(job_config([*R50, f"model.attention_impl={impl}"]), COCO_CLASSES)


def hugging_face_r50():
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    torch.manual_seed(0)
    config = DeformableDetrConfig(
        use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False, num_labels=COCO_CLASSES
    )
    return DeformableDetrForObjectDetection(config)


def padded_batch(height: int, width: int, batch: int):
    images = [torch.randn(3, height * (8 - i) // 8, width * (8 - i) // 8) for i in range(batch)]
    return nested_tensor_from_tensor_list(images)


def forward_section(args) -> dict:
    images = padded_batch(*args.size, batch=1)
    ours = {impl: our_r50(impl).detector.eval() for impl in CORES}
    theirs = hugging_face_r50().eval()
    calls = {f"ours ({impl})": (lambda m=model: m(images)) for impl, model in ours.items()}
    calls["hugging_face"] = lambda: theirs(pixel_values=images.tensors, pixel_mask=(~images.mask).long())
    with torch.inference_mode():
        return interleaved_medians(calls, args.repeats, 1, CPU)


def random_targets(batch: int, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    targets = []
    for _ in range(batch):
        centres = torch.rand(5, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(5, 2, generator=generator) * 0.2 + 0.05
        labels = torch.randint(1, COCO_CLASSES, (5,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centres, sizes], 1)})
    return targets


def train_section(args) -> dict:
    images = padded_batch(*args.train_size, batch=2)
    targets = random_targets(2, torch.Generator().manual_seed(0))
    calls = {}
    for impl in CORES:
        module = our_r50(impl).train()
        optimizer = module.build_optimizer()
        calls[f"ours ({impl})"] = lambda m=module, o=optimizer: plain_step(m, o, (images, targets), 0.1)
    theirs = hugging_face_r50().train()
    their_optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=1e-4)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    def their_step():
        loss = theirs(pixel_values=images.tensors, pixel_mask=(~images.mask).long(), labels=labels).loss
        their_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1)
        their_optimizer.step()

    calls["hugging_face"] = their_step
    times = interleaved_medians(calls, args.repeats, 1, CPU)
    memory = {name: peak_memory_mb(call, CPU) for name, call in calls.items()}  # after the timed steps
    return {"time": times, "peak_mb": memory}


def job_section(args) -> dict:
    cfg = job_config(["experiment=shapes_deformable"])
    batches = [to_device(batch, CPU) for batch in training_batches(cfg, 8)]
    calls = {}
    for impl in CORES:
        variant = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl=impl))
        pl.seed_everything(cfg.seed, verbose=False)
        from detr_backbone.training.job import build_module

        module = build_module(variant, num_classes(cfg)).train()
        optimizer = module.build_optimizer()
        stream = itertools.cycle(batches)
        calls[impl] = lambda m=module, o=optimizer, s=stream: plain_step(m, o, next(s), cfg.clip_max_norm)
    times = interleaved_medians(calls, args.repeats * 4, 2, CPU)
    return {"time": times, "batch_size": cfg.data.batch_size, "image_sides": [cfg.data.min_size, cfg.data.max_size]}


def print_table(title: str, times: dict, reference: str, extra: dict | None = None) -> None:
    print(f"\n{title} (x: times faster than {reference})")
    base = times[reference]["median_s"]
    for name, timing in times.items():
        line = f"  {name:22s} {timing['median_s']:8.3f} s   x{base / timing['median_s']:5.2f}"
        if extra:
            line += f"   peak {extra[name]:7.0f} MB"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), help="core and forward image size")
    parser.add_argument("--train-size", type=int, nargs=2, default=(480, 640))
    parser.add_argument("--sections", default="core,forward,train,job")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/deformable_attention_latest.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    sections = args.sections.split(",")
    results: dict = {"cpu": cpu_model_name(), "threads": torch.get_num_threads(), "python": platform.python_version()}
    print(f"{results['cpu']}, {results['threads']} threads, torch {torch.__version__}")
    if "core" in sections:
        results["core"] = core_section(args)
        print(f"\ncore alone: {results['core']['queries']} queries, 8 heads x 32 channels, 4 levels x 4 points")
        print(f"  largest difference to the reference: {results['core']['max_difference_to_reference']:.1e}")
        print_table("  forward", results["core"]["forward"], "hugging_face")
        print_table("  forward + backward", results["core"]["forward_backward"], "hugging_face")
    if "forward" in sections:
        results["forward"] = forward_section(args)
        print_table(
            f"Deformable DETR R50 forward, 1x3x{args.size[0]}x{args.size[1]}", results["forward"], "hugging_face"
        )
    if "train" in sections:
        results["train"] = train_section(args)
        height, width = args.train_size
        print_table(
            f"Deformable DETR R50 training step, 2x3x{height}x{width}",
            results["train"]["time"],
            "hugging_face",
            results["train"]["peak_mb"],
        )
    if "job" in sections:
        results["job"] = job_section(args)
        print_table("Deformable shapes job's training step", results["job"]["time"], "grid_sample")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    main()
