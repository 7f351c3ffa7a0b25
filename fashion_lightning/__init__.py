"""Train the FashionMNIST MLP of PyTorch's "Optimizing Model Parameters" tutorial with Lightning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fashion-lightning")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0.1.0"

from fashion_lightning.data import FashionMNISTDataModule
from fashion_lightning.model import MLP, ImageClassifier

__all__ = ["MLP", "FashionMNISTDataModule", "ImageClassifier", "__version__"]
