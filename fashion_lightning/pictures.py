"""Making your own pictures look like FashionMNIST images, for ``predict``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from fashion_lightning.errors import DataError
from fashion_lightning.fashion_mnist import IMAGE_SIZE

# what Pillow raises for a file it cannot read as a picture: not an image, truncated, a
# decompression bomb (a small file that would unpack to gigabytes of pixels)
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def to_fashion_mnist(picture: Image.Image) -> Tensor:
    """Make a picture look like a FashionMNIST image: 28x28 grayscale, light garment on dark.

    A transparent background is filled first (see :func:`fill_transparency`); a dark-on-light
    photo is inverted; a picture of another size is cropped to the garment and scaled so that
    its longer side is 28 pixels, centred, as Zalando made the data set.
    Returns a (1, 28, 28) uint8 tensor.
    """
    gray = fill_transparency(to_8_bits(ImageOps.exif_transpose(picture))).convert("L")
    pixels = np.asarray(gray)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 127:
        gray = ImageOps.invert(gray)
    if gray.size != (IMAGE_SIZE, IMAGE_SIZE):
        box = gray.point(lambda value: 255 if value > 40 else 0).getbbox()
        if box:
            gray = gray.crop(box)
        scale = IMAGE_SIZE / max(gray.size)
        size = tuple(max(1, round(side * scale)) for side in gray.size)
        gray = gray.resize(size, Image.LANCZOS)
        square = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        square.paste(gray, ((IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2))
        gray = square
    return torch.from_numpy(np.array(gray, dtype=np.uint8)).unsqueeze(0)


def to_8_bits(picture: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or floating-point grayscale picture scaled to 8 bits (0-255).

    Pillow's ``convert("L")`` clips such pictures at 255 instead of scaling them, so a 16-bit
    PNG would turn almost white (or black) and be classified with no warning. 16-bit files
    count on a 0-65535 range, floating-point ones on 0-1 (else their own maximum).
    """
    if picture.mode not in ("I", "F") and not picture.mode.startswith("I;16"):
        return picture
    pixels = np.asarray(picture, dtype=np.float64)
    if picture.mode == "F":
        top = 1.0 if pixels.max() <= 1 else pixels.max()
    else:
        top = 65535.0 if picture.mode.startswith("I;16") or pixels.max() > 255 else 255.0
    return Image.fromarray(np.clip(pixels * (255 / top), 0, 255).round().astype(np.uint8), "L")


def fill_transparency(picture: Image.Image) -> Image.Image:
    """Composite a picture with transparency onto the background it implies.

    Transparent pixels usually hold black, so a dark garment on a transparent background would
    turn into dark on black. The visible (mostly opaque) pixels decide: a dark garment gets a
    white background, a light one a black background.
    """
    has_alpha = picture.mode in ("RGBA", "LA", "PA", "RGBa", "La")
    if not has_alpha and "transparency" not in picture.info:
        return picture
    rgba = picture.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"))
    if alpha.min() == 255:
        return picture
    luminance = np.asarray(rgba.convert("L"))
    visible = luminance[alpha > 127]
    dark = visible.size > 0 and visible.mean() < 128
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if dark else (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def check_picture_folder(folder: str | Path) -> None:
    """Raise DataError unless ``folder`` holds at least one picture that can be read whole.

    ``predict`` checks this before it starts a run folder; :func:`load_pictures` reads them
    again later (a folder of your own pictures is small).
    """
    folder = Path(folder)
    entries = _entries_in(folder)
    for path in entries:
        if not path.is_file():  # a folder, a pipe (reading one would wait forever)
            continue
        try:
            with Image.open(path) as picture:
                picture.load()  # a truncated file has a good header
                return
        except UNREADABLE:
            continue
    raise _no_pictures(folder, skipped=len(entries))


def _entries_in(folder: Path) -> list[Path]:
    """What the folder holds, sorted by name: files, links and subfolders (skipped, with
    the reason, by the readers)."""
    try:
        if folder.is_file():
            raise DataError(f"--data.predict_dir {folder}: a file; pass the folder that holds it")
        if not folder.is_dir():
            raise DataError(f"--data.predict_dir {folder}: no such folder")
        return sorted(folder.iterdir())
    except OSError as err:  # a name too long, a folder that cannot be read
        raise DataError(
            f"--data.predict_dir {folder}: cannot read it ({err.strerror or err})"
        ) from None


def _reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not an image"
    if isinstance(err, Image.DecompressionBombError):
        return "too many pixels to be a photo (Pillow refuses it as a decompression bomb)"
    return str(err)


def _no_pictures(folder: Path, skipped: int) -> DataError:
    return DataError(
        f"--data.predict_dir {folder}: no readable picture ({skipped} files skipped); "
        "put PNG or JPEG files there"
    )


def load_pictures(folder: str | Path) -> tuple[Tensor, list[str]]:
    """All readable pictures in ``folder`` (sorted by name) as FashionMNIST-like images.

    Files that cannot be read as images are listed on stderr with the reason and skipped.

    Raises:
        DataError: the folder does not exist or holds no readable picture.
    """
    folder = Path(folder)
    images, names, skipped = [], [], []
    for path in _entries_in(folder):
        if path.is_dir():
            skipped.append(f"{path.name}/: a folder (pictures in subfolders are not read)")
            continue
        if not path.is_file():
            skipped.append(f"{path.name}: not a file (a pipe, a device, a broken link)")
            continue
        try:
            with Image.open(path) as picture:
                images.append(to_fashion_mnist(picture))
            names.append(path.name)
        except UNREADABLE as err:
            skipped.append(f"{path.name}: {_reason(err)}")
    for line in skipped if rank_zero_only.rank == 0 else ():  # (each process reads them)
        print(f"skipped {line}", file=sys.stderr)
    if not images:
        raise _no_pictures(folder, skipped=len(skipped))
    return torch.stack(images), names
