"""Image files as the deck should see them: one decode for every command that reads .png/.jpg files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from carddeck.errors import InvalidInput


def _rgb(im: Image.Image) -> Image.Image:
    """The image as 8-bit RGB (alpha dropped). 16-bit greyscale (PNG: modes I;16*, I) is scaled
    0..65535 -> 0..255: Pillow's convert would clip it at 255, turning most of the image white. A palette
    with transparency goes through RGBA, which Pillow otherwise asks for with a warning on stderr."""
    if im.mode.startswith("I"):
        grey = np.rint(np.asarray(im, np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def read_rgb(path: Path) -> Image.Image:
    """The file's image, upright and 8-bit RGB; InvalidInput names the file and what is wrong.

    Upright: a phone stores a portrait photo sideways with an EXIF Orientation tag (3, 6, 8, ...) that
    viewers obey, so the deck must too, or it classifies the photo on its side."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # huge images: refuse, don't thrash
            with Image.open(path) as im:
                return _rgb(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"{path}: image too large to decode safely ({exc})") from None
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path}: not a readable image ({exc})") from None
