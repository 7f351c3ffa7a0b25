"""Train the FashionMNIST MLP of PyTorch's "Optimizing Model Parameters" tutorial with Lightning."""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fashion-lightning")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0.1.0"

__all__ = ["MLP", "FashionMNISTDataModule", "ImageClassifier", "__version__"]
# imported when first asked for, so that `python -m fashion_lightning runs` needs no Lightning
_LAZY = {
    "MLP": "fashion_lightning.model",
    "ImageClassifier": "fashion_lightning.model",
    "FashionMNISTDataModule": "fashion_lightning.data",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fashion_lightning' has no attribute {name!r}")
