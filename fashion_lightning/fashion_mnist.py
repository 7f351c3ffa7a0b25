"""Facts about FashionMNIST that several modules need: its image size, classes and pixels."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

IMAGE_SIZE = 28  # pixels on each side
# the labels 0-9, in order (torchvision's FashionMNIST.classes)
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
# class names as parts of TensorBoard tags ("T-shirt/top" would open another tag level)
CLASS_TAGS = tuple(name.replace("/", "_") for name in CLASS_NAMES)
TRAINING_IMAGES = 60000
# FashionMNIST's 60k training images, pixels in [0, 1]: their mean and standard deviation
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530


def to_float_images(images: Tensor) -> Tensor:
    """uint8 pixels (0-255) -> float32 in [0, 1]: exactly what torchvision's ``ToTensor()``
    gives."""
    return images.float().div(255)
