"""What a timm model needs to take DETR's image sizes, read from the model rather than guessed.

Transformers are built for one square size: a ViT checks it in its patch embedding and holds one
grid of position embeddings, a Swin computes its shifted-window masks for it. Their constructors
switch that off (``dynamic_img_size``: position embeddings resampled to each grid; Swin's
``strict_img_size=False``: masks computed per size); the patch embedding still needs sides that are
multiples of the patch, so the images are padded to one, the padding marked in the mask. Where
timm's ``forward_intermediates`` takes an attention mask (ViT, EVA), the padded patches are left
out of attention, so an image's features depend on its padding only through the resampled
position embeddings.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIZE_SWITCHES = {"dynamic_img_size": True, "strict_img_size": False}


def meta_model(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """The model timm builds for ``name``, on the meta device (no memory, no weights): its class and
    ``feature_info`` say what it needs before the real one is built."""
    with torch.device("meta"):
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as error:
            raise ValueError(f"timm model {name!r} does not take backbone.kwargs={dict(kwargs)}: {error}") from error


def any_size_options(model: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The first size switch the model's constructor takes (none for CNNs), unless ``kwargs`` sets one."""
    if any(switch in kwargs for switch in SIZE_SWITCHES):
        return {}
    accepted = inspect.signature(type(model).__init__).parameters
    return next(({switch: value} for switch, value in SIZE_SWITCHES.items() if switch in accepted), {})


def is_single_stride(model: nn.Module) -> bool:
    """Whether every feature map of the model has the same stride (a plain ViT), from its ``feature_info``."""
    return len({level["reduction"] for level in getattr(model, "feature_info", [])}) == 1


def patch_size(body: nn.Module, name: str) -> int:
    """The side images must be a multiple of (1 for models without a patch embedding); a one-line error for
    a model whose patch embedding still takes one size only."""
    embedding = next((module for path, module in body.named_modules() if path.endswith("patch_embed")), None)
    if embedding is None or not hasattr(embedding, "patch_size"):
        return 1
    if getattr(embedding, "strict_img_size", False):
        raise ValueError(
            f"timm model {name!r} takes only {tuple(embedding.img_size)} images as built: give it "
            "backbone.kwargs={dynamic_img_size: true} or {strict_img_size: false}, whichever its constructor takes"
        )
    sides = set(embedding.patch_size)
    if len(sides) != 1:
        raise ValueError(f"timm model {name!r} has non-square patches {tuple(embedding.patch_size)}; not supported")
    return sides.pop()


def pad_to_multiple(images: Tensor, mask: Tensor, multiple: int) -> tuple[Tensor, Tensor]:
    """Images padded at the bottom and right to sides that are multiples of ``multiple``, the padding masked."""
    pad_h, pad_w = -images.shape[-2] % multiple, -images.shape[-1] % multiple
    if pad_h == 0 and pad_w == 0:
        return images, mask
    return F.pad(images, (0, pad_w, 0, pad_h)), F.pad(mask, (0, pad_w, 0, pad_h), value=True)


def takes_attention_mask(model: nn.Module) -> bool:
    forward = getattr(model, "forward_intermediates", None)
    return forward is not None and "attn_mask" in inspect.signature(forward).parameters


def token_attention_mask(mask: Tensor, patch: int, prefix_tokens: int, dtype: torch.dtype) -> Tensor | None:
    """An additive mask (batch, 1, 1, tokens) that keeps every query from attending to a patch made only
    of padding; prefix tokens (class, registers) always attend and are attended to. None without padding."""
    valid = F.max_pool2d((~mask)[:, None].float(), kernel_size=patch, stride=patch).flatten(1) > 0
    if bool(valid.all()):
        return None
    valid = torch.cat([valid.new_ones(valid.shape[0], prefix_tokens), valid], dim=1)
    additive = torch.zeros(valid.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill(~valid, torch.finfo(dtype).min)[:, None, None, :]
