"""``predict`` writes its results as a CSV file, for the test split or your own pictures."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from fashion_lightning.data import CLASS_NAMES


def write_csv(path: Path, rows: list[list]) -> None:
    """Write ``rows`` to ``path`` whole or not at all: into a temporary file, then renamed.
    A failed write (a full disk) raises OSError naming ``path``, and leaves no partial file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("w", newline="") as f:
            csv.writer(f).writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        partial.unlink(missing_ok=True)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s results to ``predictions.csv`` in the run folder, and prints where
    and, when the true labels are known, the accuracy they imply."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        indices = [i for batch in batch_indices[0] for i in batch]
        labels = torch.cat([p["label"] for p in predictions]).tolist()
        probabilities = torch.cat([p["probability"] for p in predictions]).tolist()
        targets = torch.cat([p["target"] for p in predictions]).tolist()
        names = getattr(trainer.predict_dataloaders.dataset, "names", None)
        suffix = "" if trainer.world_size == 1 else f"-rank{trainer.global_rank}"
        path = Path(trainer.log_dir or trainer.default_root_dir) / f"predictions{suffix}.csv"
        rows = [
            [index, target] if names is None else [names[index]]
            for index, target in zip(indices, targets, strict=True)
        ]
        rows = sorted(
            [*row, label, CLASS_NAMES[label], f"{probability:.6f}"]
            for row, label, probability in zip(rows, labels, probabilities, strict=True)
        )
        header = ["index", "true_label"] if names is None else ["file"]
        write_csv(path, [[*header, "predicted_label", "class_name", "probability"], *rows])
        if names is None:
            correct = sum(label == target for label, target in zip(labels, targets, strict=True))
            summary = f"{len(labels)} test images, accuracy {correct / len(labels):.2%}"
        else:
            summary = f"{len(labels)} pictures"
        print(f"predictions: {summary} -> {path}")
