"""Drawing helpers shared by the prediction grid and the render command: model inputs back to
pixels, boxes on them, scalar maps as colour tiles, and tiles saved as one PNG grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, make_grid

from .transforms import IMAGENET_MEAN, IMAGENET_STD, pixel_statistics

GRID_PADDING = 2
BACKGROUND = 255  # white between and around tiles
NEGATIVE, POSITIVE = (0.13, 0.40, 0.80), (0.84, 0.15, 0.16)  # blue below zero, red above, white at zero
TRUTH_COLOR, PREDICTION_COLOR = (0, 190, 0), (230, 30, 30)  # boxes: ground truth green, predictions red


def valid_size(mask: Tensor) -> tuple[int, int]:
    """(height, width) of the unpadded region of one (H, W) padding mask (padding is at the bottom/right)."""
    return int((~mask[:, 0]).sum()), int((~mask[0]).sum())


def denormalize(image: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """A normalized (3, H, W) model input back to uint8 RGB pixels."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=image.device)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32, device=image.device)[:, None, None]
    pixels = image.float() * std_t + mean_t
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def resize_longer_side(image: Tensor, side: int) -> tuple[Tensor, float]:
    """``image`` (C, H, W) scaled so that its longer side is ``side`` pixels, and the scale factor used."""
    height, width = image.shape[-2:]
    scale = side / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    return TF.resize(image, size, antialias=True), scale


def draw_boxes(
    image: Tensor, boxes: Tensor, captions: Sequence[str], color: tuple[int, int, int], width: int = 2
) -> Tensor:
    """XYXY pixel ``boxes`` with their captions drawn on a uint8 (3, H, W) image."""
    if len(boxes) == 0:
        return image
    return draw_bounding_boxes(
        image,
        boxes.float().cpu(),
        labels=list(captions),
        colors=color,
        width=width,
        label_colors=(255, 255, 255),
        fill_labels=True,
    )


def target_panel(
    image: Tensor, target: dict[str, Tensor], captions: Sequence[str], side: int, normalized: bool = True
) -> tuple[Tensor, float]:
    """A padded model input (3, H, W), ImageNet-``normalized`` or pixels / 255, as uint8 pixels of its unpadded
    region, scaled to ``side`` on its longer side, with its target's boxes (DETR's normalized cxcywh, in the
    unpadded ``size``); and the scale used."""
    height, width = target["size"].tolist()
    panel, scale = resize_longer_side(denormalize(image[:, :height, :width], *pixel_statistics(normalized)), side)
    truth = box_convert(target["boxes"].float().cpu(), "cxcywh", "xyxy") * torch.tensor([width, height, width, height])
    return draw_boxes(panel, truth * scale, captions, TRUTH_COLOR), scale


def caption(tile: Tensor, text: str) -> Tensor:
    """``text`` written in the top-left corner of a uint8 (3, H, W) tile, on a white strip so it stays legible."""
    picture = TF.to_pil_image(tile)
    draw = ImageDraw.Draw(picture)
    _left, _top, right, bottom = draw.textbbox((2, 1), text)
    draw.rectangle((0, 0, right + 2, bottom + 1), fill=(255, 255, 255))
    draw.text((2, 1), text, fill=(0, 0, 0))
    return TF.pil_to_tensor(picture)


def heatmap(values: Tensor, size: tuple[int, int], signed: bool = False) -> Tensor:
    """A 2-D map as a uint8 (3, H, W) tile of ``size`` (nearest upsampling, so feature cells stay visible).

    ``signed``: zero is white, the largest magnitude full blue (negative) or red (positive), the
    scale symmetric; otherwise the map is stretched min..max onto black..white.
    """
    values = values.detach().float().cpu()
    if signed:
        level = values / values.abs().max().clamp_min(1e-12)  # -1..1
        tint = torch.where(
            level[None] < 0, torch.tensor(NEGATIVE)[:, None, None], torch.tensor(POSITIVE)[:, None, None]
        )
        rgb = 1 - level.abs()[None] * (1 - tint)
    else:
        low, high = values.min(), values.max()
        rgb = ((values - low) / (high - low).clamp_min(1e-12))[None].expand(3, -1, -1)
    rgb = F.interpolate(rgb[None], size=size, mode="nearest")[0]
    return (rgb * 255).round().to(torch.uint8)


def tile_grid(tiles: Sequence[Tensor], nrow: int) -> Tensor:
    """Tiles of any sizes, each padded with white to the largest one, in rows of ``nrow``: a uint8 (3, H, W) image."""
    if not tiles:
        raise ValueError("tile_grid needs at least one tile")
    height = max(tile.shape[-2] for tile in tiles)
    width = max(tile.shape[-1] for tile in tiles)
    padded = [F.pad(tile, (0, width - tile.shape[-1], 0, height - tile.shape[-2]), value=BACKGROUND) for tile in tiles]
    return make_grid(padded, nrow=nrow, padding=GRID_PADDING, pad_value=BACKGROUND)


def write_png(image: Tensor, stream: BinaryIO) -> None:
    """A uint8 (3, H, W) image encoded as a PNG into a binary stream."""
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(stream, format="PNG")


def save_png(image: Tensor, path: Path) -> Path:
    """A uint8 (3, H, W) image written as a PNG (folders created); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as stream:
        write_png(image, stream)
    return path
