"""Image files decoded as the deck should see them (carddeck.client.images), for `carddeck predict` and
`carddeck shift --foreign`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carddeck.client.images import read_rgb
from carddeck.commands.predict import load_file
from carddeck.commands.shift import photo_crops

ORIENTATION = 0x0112  # the EXIF tag a phone sets instead of rotating the pixels
# how the camera stored an upright picture for each tag (the viewer undoes it)
STORED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _upright() -> Image.Image:
    """An asymmetric 40 x 64 picture: a red block top left, a green bar along the bottom, a blue ramp."""
    a = np.zeros((40, 64, 3), np.uint8)
    a[:12, :20, 0] = 255
    a[32:, :, 1] = 255
    a[..., 2] = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(a)


def _jpeg(path: Path, im: Image.Image, orientation: int | None = None) -> Path:
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    im.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_a_photo_with_an_exif_orientation_decodes_upright(tmp_path, orientation):
    """Mutant: Image.open without ImageOps.exif_transpose (as before): the sideways photo keeps its stored
    shape and pixels, so the deck classifies it on its side; predict's loader and shift's crops both go
    through the one decode."""
    upright = _jpeg(tmp_path / "upright.jpg", _upright())
    phone = _jpeg(tmp_path / "phone.jpg", _upright().transpose(STORED[orientation]), orientation)
    want = np.asarray(read_rgb(upright), np.int16)
    got = np.asarray(read_rgb(phone), np.int16)
    assert got.shape == want.shape == (40, 64, 3)
    assert np.abs(got - want).mean() < 3  # JPEG's own error
    stored = np.asarray(Image.open(phone).convert("RGB"), np.int16)  # what the mutant decodes
    assert stored.shape != want.shape or np.abs(stored - want).mean() > 30
    names, arr = load_file(phone, (32, 32))
    assert names == [str(phone)] and arr.shape == (1, 32, 32, 3)
    assert np.abs(arr.astype(np.int16) - load_file(upright, (32, 32))[1]).mean() < 3
    crops = photo_crops(phone, 4, (16, 16), np.random.default_rng(0))
    assert np.abs(crops.astype(np.int16) - photo_crops(upright, 4, (16, 16), np.random.default_rng(0))).mean() < 3


def test_a_file_that_is_no_image_is_named():
    with pytest.raises(Exception, match="not-there.jpg: not a readable image"):
        read_rgb(Path("not-there.jpg"))
