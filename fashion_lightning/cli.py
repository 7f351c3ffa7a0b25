"""``python -m fashion_lightning {fit,validate,test,predict} --config configs/sgd.yaml``."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from fashion_lightning.data import DataError, FashionMNISTDataModule
from fashion_lightning.model import ImageClassifier

DEBUG_ENV = "FASHION_LIGHTNING_DEBUG"
# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (DataError,)


class SaveRunConfig(SaveConfigCallback):
    """Saves the config into the run folder as ``config.yaml``, or ``config-2.yaml`` and so on
    when one is there already (a pinned logger version), so a second run never fails or
    overwrites the first run's record."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved and trainer.log_dir is not None:
            name, n = "config.yaml", 1
            while trainer.is_global_zero and os.path.exists(os.path.join(trainer.log_dir, name)):
                n += 1
                name = f"config-{n}.yaml"
            self.config_filename = trainer.strategy.broadcast(name)
        super().setup(trainer, pl_module, stage)


class FashionCLI(LightningCLI):
    """LightningCLI with this project's defaults: best-on-``val/acc`` and last checkpoints,
    TensorBoard logs under ``lightning_logs/``, and a test pass after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:02d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def after_fit(self) -> None:
        """Evaluate the best checkpoint on the official test split, as the tutorial does."""
        if self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def main(args: list[str] | None = None) -> None:
    """Command-line entry point; ``args`` replaces ``sys.argv[1:]`` (tests pass a list)."""
    try:
        FashionCLI(
            ImageClassifier,
            FashionMNISTDataModule,
            args=args,
            save_config_callback=SaveRunConfig,
        )
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
