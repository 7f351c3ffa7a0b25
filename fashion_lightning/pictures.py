"""Making your own pictures look like FashionMNIST images, for ``predict``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from fashion_lightning.errors import DataError
from fashion_lightning.raw_files import IMAGE_SIZE


def to_fashion_mnist(picture: Image.Image) -> Tensor:
    """Make a picture look like a FashionMNIST image: 28x28 grayscale, light garment on dark.

    A dark-on-light photo is inverted; a picture of another size is cropped to the garment and
    scaled so that its longer side is 28 pixels, centred, as Zalando made the data set.
    Returns a (1, 28, 28) uint8 tensor.
    """
    gray = ImageOps.exif_transpose(picture).convert("L")
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


def load_pictures(folder: str | Path) -> tuple[Tensor, list[str]]:
    """All readable pictures in ``folder`` (sorted by name) as FashionMNIST-like images.

    Files that cannot be read as images are listed on stderr with the reason and skipped.

    Raises:
        DataError: the folder does not exist or holds no readable picture.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--data.predict_dir {folder}: no such folder")
    images, names, skipped = [], [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            with Image.open(path) as picture:
                images.append(to_fashion_mnist(picture))
            names.append(path.name)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            reason = "not an image" if isinstance(err, UnidentifiedImageError) else str(err)
            skipped.append(f"{path.name}: {reason}")
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if not images:
        raise DataError(
            f"--data.predict_dir {folder}: no readable picture ({len(skipped)} files skipped); "
            "put PNG or JPEG files there"
        )
    return torch.stack(images), names
