"""What the TensorBoard pictures (ClassificationImages) cost, in a real fit.

    python benchmarks/image_cost.py --epochs 3

Times every hook of the callback (updating the confusion matrix, drawing, PNG encoding and
writing) during a real ``fit`` of the tutorial's setup, and prints it against the run's time.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fashion_lightning.data import FashionMNISTDataModule
from fashion_lightning.model import ImageClassifier
from fashion_lightning.raw_files import DEBIAN_SOURCE_DIR, ensure_raw_files
from fashion_lightning.visuals import ClassificationImages

HOOKS = ("on_validation_epoch_start", "on_validation_batch_end", "on_validation_epoch_end")


class TimedImages(ClassificationImages):
    """ClassificationImages that adds up the time spent in its validation hooks."""

    spent = 0.0


def _timed(hook: str):
    original = getattr(ClassificationImages, hook)

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            TimedImages.spent += time.perf_counter() - start

    return wrapper


for _hook in HOOKS:
    setattr(TimedImages, _hook, _timed(_hook))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    data_dir = Path(__file__).resolve().parents[1] / "data"
    ensure_raw_files(data_dir, DEBIAN_SOURCE_DIR, download=False)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_epochs=args.epochs,
            default_root_dir=root,
            callbacks=[TimedImages()],
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(ImageClassifier(), datamodule=FashionMNISTDataModule(data_dir=str(data_dir)))
        total = time.perf_counter() - start
    spent = TimedImages.spent
    print(
        f"pictures: {spent / args.epochs * 1000:.0f} ms per epoch; {spent:.2f} s of a "
        f"{total:.1f} s fit ({spent / total:.1%})"
    )


if __name__ == "__main__":
    main()
