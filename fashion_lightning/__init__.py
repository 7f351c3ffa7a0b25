"""Train the FashionMNIST MLP of PyTorch's "Optimizing Model Parameters" tutorial with Lightning."""

from fashion_lightning.data import FashionMNISTDataModule
from fashion_lightning.model import MLP, ImageClassifier

__all__ = ["MLP", "FashionMNISTDataModule", "ImageClassifier"]
