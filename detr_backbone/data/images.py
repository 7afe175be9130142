"""Images as 8-bit RGB whatever their mode, and the errors of image files that cannot be used.

``Image.convert("RGB")`` alone gets two kinds of files wrong: 16-bit greyscale (PNG, TIFF) is
clipped at 255, so an image of values up to 65535 turns almost white; and palette images with
transparency make PIL warn on every read. Those are converted here by meaning: 16 bits scaled to 8,
palette through RGBA. Alpha is dropped (the colour under transparent pixels stays, as in DETR).

A phone photo is often stored sideways with an EXIF orientation that viewers apply. ``upright``
applies it, as viewers (and Hugging Face's image loading) do: inference reads photos upright. The
training data reads stored pixels, as COCO's annotation files describe them (``verify`` names the
images whose orientation turns them to the size their annotation file says).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 32-bit integers, as PIL reads 16-bit PNGs too
SIXTEEN_TO_EIGHT = 257  # 65535 / 255
ORIENTATION_TAG = 0x0112  # EXIF's Orientation: 1 as stored; 2-8 mirrored and/or turned
TURNED = (5, 6, 7, 8)  # the orientations that turn the stored image a quarter, swapping width and height


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1 (as stored) without one."""
    value = image.getexif().get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
    """``image`` as viewers show it: its EXIF orientation applied (and dropped from its EXIF)."""
    return ImageOps.exif_transpose(image) if exif_orientation(image) != 1 else image


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of ``image`` as viewers show it, read from the header alone."""
    turned = exif_orientation(image) in TURNED
    return (image.width, image.height) if turned else (image.height, image.width)


class BadImageError(Exception):
    """An image file that cannot be used, raised as one of the two below (so ``data.bad_samples`` can tell
    it from other errors)."""


class UnreadableImageError(BadImageError, ValueError):
    """Truncated, damaged or not an image."""


class MissingImageError(BadImageError, FileNotFoundError):
    pass


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((levels + SIXTEEN_TO_EIGHT // 2) // SIXTEEN_TO_EIGHT).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


@contextlib.contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """PIL's lazily decoded image at ``path``; errors while opening or decoding it name the file."""
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise MissingImageError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as error:  # not an OSError: PIL refuses to decode the file at all
        raise UnreadableImageError(
            f"cannot read image {path}: {error} (PIL's decompression-bomb limit is twice "
            f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; raise it only for files you trust)"
        ) from None
    except OSError as error:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise UnreadableImageError(f"cannot read image {path}: {error}") from error


def load_rgb_image(path: Path, as_viewed: bool = False) -> Image.Image:
    """The image at ``path``, decoded whole (a truncated file fails here), as 8-bit RGB: its stored pixels,
    or with ``as_viewed`` turned by its EXIF orientation as viewers show it."""
    with open_image(path) as image:
        return as_rgb(upright(image) if as_viewed else image)


def image_suffixes() -> set[str]:
    """The file suffixes of every format PIL can open."""
    return {suffix for suffix, name in Image.registered_extensions().items() if name in Image.OPEN}
