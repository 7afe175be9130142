"""Layer-wise learning-rate decay and weight-decay exemptions for transformer backbones.

BEiT, ViTDet and DINOv2 fine-tuning give each transformer block its own learning rate: block i of
n trains at ``lr_backbone * decay ** (n - i)`` (i from 0), the patch and position embeddings (what
precedes the first block) at ``decay ** (n + 1)``, what follows the last block (a final norm) at
``lr_backbone`` itself, so the layers nearest the pretrained input move least. As in timm's
recipes, norms, biases, position embeddings and tokens take no weight decay.
"""

from __future__ import annotations

import re

from torch import nn

from .freezing import parameter_stages

NO_WEIGHT_DECAY_NAMES = re.compile(r"(pos_embed|_token|relative_position_bias_table)$")


def transformer_blocks(body: nn.Module) -> list[str]:
    """The names of a body's transformer blocks (``model.blocks.0``, Swin's ``layers_0.blocks.0``, ...), in order."""
    return [path for path, _ in body.named_modules() if re.fullmatch(r"(.+\.)?blocks\.\d+", path)]


def parameter_layers(body: nn.Module, blocks: list[str]) -> dict[str, int]:
    """Each parameter's layer: 0 before the first block, i + 1 in block i (or between blocks i - 1 and i:
    Swin's patch merging), n + 1 after the last of the n blocks."""
    stages = parameter_stages(body, blocks)
    last = blocks[-1] + "."
    names = [name for name, _ in body.named_parameters()]
    end = max(index for index, name in enumerate(names) if name.startswith(last))
    return {name: len(blocks) + 1 if index > end else stages[name] for index, name in enumerate(names)}


def takes_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    return parameter.ndim > 1 and not NO_WEIGHT_DECAY_NAMES.search(name)


def layer_decay_groups(body: nn.Module, lr: float, decay: float | None) -> list[dict]:
    """Parameter groups of a transformer body's trainable tensors: one per layer with ``decay`` (one in all
    without), each split into tensors with and without weight decay; frozen tensors join none."""
    blocks = transformer_blocks(body)
    if decay is not None and not blocks:
        raise ValueError(
            f"backbone.lr_layer_decay={decay} needs a backbone made of transformer blocks (ViT, Swin, ...); "
            f"{type(body).__name__} has none: set lr_layer_decay=null"
        )
    layers = parameter_layers(body, blocks) if decay is not None else {}
    top = len(blocks) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in body.named_parameters():
        if not parameter.requires_grad:
            continue
        layer, decayed = layers.get(name, top), takes_weight_decay(name, parameter)
        if (layer, decayed) not in groups:
            scale = 1.0 if decay is None else decay ** (top - layer)
            group = {
                "name": f"backbone.layer{layer}" if decay is not None else "backbone",
                "params": [],
                "lr": lr * scale,
            }
            if not decayed:
                group.update(name=group["name"] + ".no_weight_decay", weight_decay=0.0)
            groups[layer, decayed] = group
        groups[layer, decayed]["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]
