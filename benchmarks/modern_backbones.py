"""Joiner inference at DETR's image size for transformer backbones against ResNet-50, and what padding changes.

python -m benchmarks.modern_backbones [--repeats N] [--size H W]

Throughput: each Joiner (three levels, strides 8/16/32: the Deformable head's input; ResNet-50's
layers 2-4, ViT-S/16 through the simple feature pyramid) runs once per round on one image, all in
one process and interleaved, so the ratios to ResNet-50 hold however loaded the machine is.

Padding: the same image (a multiple of no stride) alone, then beside an image larger on both
sides, so that it is padded; the stride-16 features over the image's own region are compared, as
the largest change relative to the largest feature. Weights are random (timm builds no weights
offline); the figures say how padding enters each architecture, not how much a trained one moves.
"""

from __future__ import annotations

import argparse

import torch

from detr_backbone import build_backbone, nested_tensor_from_tensor_list

from .timing import interleaved_medians

JOINERS = {
    "resnet50": {"kind": "torchvision", "name": "resnet50"},
    "vit_small_patch16_224 + pyramid": {"kind": "timm", "name": "vit_small_patch16_224"},
    "swin_tiny_patch4_window7_224": {"kind": "timm", "name": "swin_tiny_patch4_window7_224"},
    "convnext_tiny": {"kind": "timm", "name": "convnext_tiny"},
}


def joiner(backbone: dict, levels: list[int]) -> torch.nn.Module:
    return build_backbone({"backbone": {**backbone, "levels": levels}, "lr_backbone": 0.0}).eval()


def throughput(size: tuple[int, int], repeats: int) -> None:
    images = nested_tensor_from_tensor_list([torch.rand(3, *size)])
    built = {name: joiner(backbone, [2, 3, 4]) for name, backbone in JOINERS.items()}
    with torch.no_grad():
        times = interleaved_medians(
            {name: (lambda j=j: j(images)) for name, j in built.items()}, repeats, 1, torch.device("cpu")
        )
    base = times["resnet50"]["median_s"]
    print(f"Joiner inference, 1 image {size[0]}x{size[1]}, levels strides 8/16/32, median of {repeats}")
    for name, timing in times.items():
        print(f"  {name:34s} {timing['median_s']:7.3f} s  {base / timing['median_s']:5.2f}x ResNet-50's images/s")


def padding_change(size: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    image, larger = torch.rand(3, *size, generator=generator), torch.rand(3, size[0] + 99, size[1] + 77)
    print(f"Padding: a {size[0]}x{size[1]} image alone and beside a {size[0] + 99}x{size[1] + 77} one, stride-16 map")
    for name, backbone in JOINERS.items():
        built = joiner(backbone, [3])
        variants = {name: built}
        if getattr(built[0], "attention_mask", False):
            unmasked = joiner(backbone, [3])
            unmasked.load_state_dict(built.state_dict())
            unmasked[0].attention_mask = False
            variants[f"{name} (attention unmasked)"] = unmasked
        for label, model in variants.items():
            with torch.no_grad():
                alone = model(nested_tensor_from_tensor_list([image]))[0][0].tensors[0]
                padded = model(nested_tensor_from_tensor_list([image, larger]))[0][0].tensors[0]
            h, w = alone.shape[-2:]
            change = (padded[:, :h, :w] - alone).abs().max() / alone.abs().max()
            print(f"  {label:50s} max change / max feature {change.item():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066))
    args = parser.parse_args()
    torch.manual_seed(0)
    throughput(tuple(args.size), args.repeats)
    padding_change((250, 333))


if __name__ == "__main__":
    main()
