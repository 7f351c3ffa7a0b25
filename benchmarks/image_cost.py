"""What TensorBoard's extras cost, in a real fit: the pictures, the per-class accuracies, the
HParams bookkeeping, the training cross-entropy of each step, the training images evaluated
at each validation and the scalar writes.

    python benchmarks/image_cost.py --epochs 3

Times every hook of ClassificationImages (updating the confusion matrix, drawing, PNG encoding
and writing) and of HParamsSummary, the per-class accuracy metrics of the model (their
updates and their 20 tags a validation and test), the sum of each step's cross-entropy, the
evaluation of 5,000 training images at each validation (``train_eval/*``, the gap) and every
scalar write of the project's logger (those
curves included), during a real ``fit`` of the tutorial's setup, and prints each against the
run's time.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fashion_lightning.data import FashionMNISTDataModule
from fashion_lightning.model import ImageClassifier
from fashion_lightning.raw_files import DEBIAN_SOURCE_DIR, ensure_raw_files
from fashion_lightning.run_folders import RunFolderLogger
from fashion_lightning.visuals import ClassificationImages, HParamsSummary

SPENT: dict[str, float] = defaultdict(float)


def timed(name: str, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start

    return wrapper


def time_hooks(callback_class: type, name: str) -> None:
    for hook in dir(callback_class):
        if hook.startswith("on_") and hook in callback_class.__dict__:
            setattr(callback_class, hook, timed(name, getattr(callback_class, hook)))


class TimedClassifier(ImageClassifier):
    """The model, with its per-class metrics timed (updates and logging)."""

    def __init__(self) -> None:
        super().__init__()
        for metric in (self.val_acc_class, self.test_acc_class):
            metric.update = timed("per-class accuracy", metric.update)

    _log_per_class = timed("per-class accuracy", ImageClassifier._log_per_class)
    _add_cross_entropy = timed("train cross-entropy", ImageClassifier._add_cross_entropy)
    # the training images evaluated at each validation, for train_eval/* and the gap
    on_validation_epoch_start = timed(
        "training images evaluated", ImageClassifier.on_validation_epoch_start
    )
    _log_training_images = timed("training images evaluated", ImageClassifier._log_training_images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    data_dir = Path(__file__).resolve().parents[1] / "data"
    ensure_raw_files(data_dir, DEBIAN_SOURCE_DIR, download=False)
    time_hooks(ClassificationImages, "pictures")
    time_hooks(HParamsSummary, "hparams")
    # every scalar written to TensorBoard, the curves against epochs (epoch/*) among them
    RunFolderLogger.log_metrics = timed("scalar writes", RunFolderLogger.log_metrics)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_epochs=args.epochs,
            logger=RunFolderLogger(root),
            callbacks=[ClassificationImages(), HParamsSummary()],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        )
        datamodule = FashionMNISTDataModule(data_dir=str(data_dir))
        model = TimedClassifier()
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        trainer.test(model, datamodule=datamodule)
        total = time.perf_counter() - start
    epoch = total / args.epochs
    print(f"fit of {args.epochs} epochs and a test: {total:.1f} s ({epoch:.2f} s an epoch)")
    for name, spent in SPENT.items():
        print(
            f"{name}: {spent / args.epochs * 1000:.0f} ms per epoch, "
            f"{spent / args.epochs / epoch:.1%} of an epoch"
        )


if __name__ == "__main__":
    main()
