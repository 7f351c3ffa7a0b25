"""``predict`` writes its results as a CSV file, for the test split or your own pictures."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from fashion_lightning.fashion_mnist import CLASS_NAMES
from fashion_lightning.files import atomic_write


def write_csv(path: Path, rows: list[list]) -> None:
    """Write ``rows`` to ``path`` whole or not at all (a failed write raises OSError naming
    ``path`` and leaves no partial file)."""
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([[_cell(value) for value in row] for row in rows])


def _cell(value: Any) -> Any:
    """A value as a spreadsheet may show it, never as a formula: text that begins with ``=``,
    ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'`` (OWASP's advice on
    CSV injection); numbers are written as they are."""
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + value
    return value


def readable_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by Python as surrogates) as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
        rows = [
            [index, target] if names is None else [readable_name(names[index])]
            for index, target in zip(indices, targets, strict=True)
        ]
        rows = [
            [*row, label, CLASS_NAMES[label], f"{probability:.6f}"]
            for row, label, probability in zip(rows, labels, probabilities, strict=True)
        ]
        correct = sum(label == target for label, target in zip(labels, targets, strict=True))
        # (in every process: under DDP, Lightning broadcasts the log_dir of process 0)
        path = Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"
        if trainer.world_size > 1:  # each process predicted its share: process 0 writes all
            shares = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, (rows, correct))
            if not trainer.is_global_zero:
                return
            rows = [row for share_rows, _ in shares for row in share_rows]
            correct = sum(share_correct for _, share_correct in shares)
        rows.sort()
        header = ["index", "true_label"] if names is None else ["file"]
        write_csv(path, [[*header, "predicted_label", "class_name", "probability"], *rows])
        if names is None:
            summary = f"{len(rows)} test images, accuracy {correct / len(rows):.2%}"
        else:
            summary = f"{len(rows)} pictures"
        bar = trainer.progress_bar_callback
        say = bar.print if bar is not None and bar.is_enabled else print  # above the bar, not on it
        say(f"predictions: {summary} -> {path}")
