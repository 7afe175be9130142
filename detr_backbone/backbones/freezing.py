"""Which backbone parameters train: DETR's rule, generalised to any network cut into stages.

A backbone has five stages: the stem (stage 0) and the four stages that end at the last four
feature levels (strides 4, 8, 16, 32 for a ResNet: layer1..layer4). ``trainable_layers = k``
trains the last k stages, like torchvision's detection builders. DETR trains layer2..layer4 when
the backbone has a learning rate (k = 3) and nothing otherwise (k = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

NUM_STAGES = 5
DETR_TRAINABLE_LAYERS = 3


def detr_trainable_layers(train_backbone: bool) -> int:
    return DETR_TRAINABLE_LAYERS if train_backbone else 0


def parameter_stages(body: nn.Module, stage_modules: Sequence[str]) -> dict[str, int]:
    """Stage index of every parameter of ``body``.

    ``stage_modules`` names, in order, the modules of ``body`` that end stages 1, 2, ...; a body cut
    short after an earlier level may name fewer. Parameters are taken in registration order, which
    for these feed-forward networks is execution order: what precedes the first stage module is the
    stem, what lies between two stage modules belongs to the later one, and what follows the last
    one (a final norm) belongs to the last stage.
    """
    order = {name: index for index, (name, _) in enumerate(body.named_parameters())}
    bounds = []
    for module_name in stage_modules:
        positions = [order[f"{module_name}.{name}"] for name, _ in body.get_submodule(module_name).named_parameters()]
        if not positions:
            raise ValueError(f"stage module {module_name!r} has no parameters; cannot place the stage boundaries")
        bounds.append((min(positions), max(positions)))
    stages = {}
    for name, index in order.items():
        if not bounds or index < bounds[0][0]:
            stages[name] = 0
        else:
            stages[name] = min(1 + sum(last < index for _, last in bounds), len(bounds))
    return stages


def freeze_stages(
    body: nn.Module, stage_modules: Sequence[str], trainable_layers: int, num_stages: int = NUM_STAGES
) -> None:
    """Set ``requires_grad`` so that exactly the last ``trainable_layers`` of ``num_stages`` stages train
    (a ViT's: the stem and one stage a transformer block)."""
    if not 0 <= trainable_layers <= num_stages:
        raise ValueError(f"trainable_layers must be between 0 and {num_stages}, got {trainable_layers}")
    first_trained = num_stages - trainable_layers
    stages = parameter_stages(body, stage_modules)
    for name, parameter in body.named_parameters():
        parameter.requires_grad_(stages[name] >= first_trained)
