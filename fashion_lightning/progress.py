"""The progress bar of a run, counting optimizer steps."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

REFRESH_RATE = 10  # steps between redraws: redrawing after every ~2 ms step costs up to 10%


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, redrawn every few steps, that counts optimizer steps also
    when one call of ``training_step`` makes several (``model.steps_per_call``; Lightning
    counts calls)."""

    def __init__(self, refresh_rate: int = REFRESH_RATE) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._epoch_start_step = 0

    @staticmethod
    def _steps_per_call(trainer: L.Trainer) -> int:
        return getattr(trainer.lightning_module, "steps_per_call", 1)

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if self._steps_per_call(trainer) == 1:
            return super().total_train_batches
        return trainer.datamodule.training_batches()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        version = trainer.logger.version if trainer.logger is not None else None
        if "v_num" in items and isinstance(version, str):  # Lightning keeps 4 characters
            items["v_num"] = version  # the run's whole name: sgd_0, not gd_0
        return items

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        self._epoch_start_step = trainer.global_step
        super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._steps_per_call(trainer) > 1:  # the bar's position: the steps of this epoch
            batch_idx = trainer.global_step - self._epoch_start_step - 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        """End the line of a bar being drawn, so that the error (or the stop) that the command
        says next starts a line of its own."""
        for bar in self._bars():
            if not bar.disable:  # (a closed bar is disabled: its line has ended)
                bar.fp.write("\n")
                bar.fp.flush()
                return

    def _bars(self) -> list[Any]:
        bars = (
            self._train_progress_bar,
            self._val_progress_bar,
            self._test_progress_bar,
            self._predict_progress_bar,
        )
        return [bar for bar in bars if bar is not None]
