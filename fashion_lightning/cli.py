"""``python -m fashion_lightning {fit,validate,test,predict} --config configs/sgd.yaml``."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fashion_lightning.callbacks import (
    LAST_CHECKPOINT,
    AtomicCheckpointIO,
    ResumableTraining,
    last_checkpoint_path,
)
from fashion_lightning.data import FashionMNISTDataModule
from fashion_lightning.errors import CheckpointError, UserError
from fashion_lightning.model import ImageClassifier
from fashion_lightning.predict import PredictionWriter
from fashion_lightning.raw_files import ensure_writable_dir
from fashion_lightning.visuals import ClassificationImages, HParamsSummary

DEBUG_ENV = "FASHION_LIGHTNING_DEBUG"
# --ckpt_path values that name no file and that Lightning resolves ("last" is resolved here)
LIGHTNING_CKPT_PATHS = ("best", "hpc", "registry")
PROGRESS_BAR_REFRESH_RATE = 10  # batches between redraws of the default progress bar

# ResumableTraining makes a mid-epoch resume exact; Lightning cannot see that and warns.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")


class SaveRunConfig(SaveConfigCallback):
    """Saves the config into the run folder as ``config.yaml``, or ``config-2.yaml`` and so on
    when one is there already (a resumed run, a pinned logger version), so a second run never
    fails and never overwrites the first run's record."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved:
            log_dir = trainer.log_dir  # a collective call under DDP: every rank makes it once
            name, n = "config.yaml", 1
            while trainer.is_global_zero and os.path.exists(os.path.join(log_dir, name)):
                n += 1
                name = f"config-{n}.yaml"
            self.config_filename = trainer.strategy.broadcast(name)
        super().setup(trainer, pl_module, stage)


def find_last_checkpoint(trainer: Trainer) -> Path | None:
    """The newest ``last.ckpt`` of any earlier run under this trainer's log root.

    Lightning's own ``ckpt_path="last"`` only looks in the *new* run's folder (a new
    ``version_N``), so in a new process it silently trains from scratch.
    """
    callback = trainer.checkpoint_callback
    user_folder = callback is not None and callback.dirpath
    if not user_folder and trainer.logger is not None and getattr(trainer.logger, "root_dir", None):
        candidates = Path(trainer.logger.root_dir).glob(f"*/checkpoints/{LAST_CHECKPOINT}")
    else:  # a folder the user chose, or no logger: the one place this run would write it
        candidates = [last_checkpoint_path(trainer)]
    existing = [path for path in candidates if path.is_file()]
    return max(existing, key=lambda path: path.stat().st_mtime, default=None)


def read_checkpoint(path: Path) -> dict:
    """Load the checkpoint at ``path``; CheckpointError if it is missing, empty or unreadable."""
    if not path.is_file():
        raise CheckpointError(
            f"--ckpt_path {path}: no such file. Runs keep theirs in "
            "lightning_logs/version_N/checkpoints/; --ckpt_path last takes the newest"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"--ckpt_path {path}: the file is empty; pick another checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"--ckpt_path {path}: not a readable checkpoint, truncated or not a PyTorch file "
            f"({type(err).__name__}); pick another checkpoint"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"--ckpt_path {path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def check_checkpoint_fits(path: Path, checkpoint: dict, model: torch.nn.Module) -> None:
    """CheckpointError unless the checkpoint's weights have the names and shapes of ``model``'s."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(getattr(t, "shape", ())) for name, t in checkpoint["state_dict"].items()}
    if found != expected:
        differences = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise CheckpointError(
            f"--ckpt_path {path}: a checkpoint of another model (differs in "
            f"{', '.join(f'{name} {shape}' for name, shape in differences)}); "
            "pass a checkpoint that this project's fit wrote"
        )


class FashionCLI(LightningCLI):
    """LightningCLI with this project's defaults: best-on-``val/acc`` and last checkpoints,
    TensorBoard logs under ``lightning_logs/``, resumable runs, and a test pass after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ClassificationImages, "images")
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

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before Lightning reads the model's hyperparameters from it
        (Lightning's own read of a damaged file is a traceback)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "last", *LIGHTNING_CKPT_PATHS):
            read_checkpoint(Path(ckpt_path))
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(ResumableTraining())
        if trainer.logger is not None:
            trainer.callbacks += [LearningRateMonitor(logging_interval="step"), HParamsSummary()]
        if self.subcommand == "predict":
            trainer.callbacks.append(PredictionWriter())
        self._slow_down_default_progress_bar(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _slow_down_default_progress_bar(self, trainer: Trainer) -> None:
        """Refresh Lightning's default progress bar every few batches instead of every batch.

        Redrawing it after every one of this model's ~2 ms steps costs up to 10% of an epoch;
        a bar the user configured (``--trainer.callbacks TQDMProgressBar``) is left alone.
        """
        bar = trainer.progress_bar_callback
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        if type(bar) is TQDMProgressBar and bar.refresh_rate == 1 and bar not in configured:
            trainer.callbacks[trainer.callbacks.index(bar)] = TQDMProgressBar(
                refresh_rate=PROGRESS_BAR_REFRESH_RATE
            )

    def _check_inputs(self) -> None:
        """Turn the expected failures after parsing into one-line errors, before any work."""
        config = self.config_init[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path not in (None, *LIGHTNING_CKPT_PATHS):
            config["ckpt_path"] = str(self._checked_checkpoint(ckpt_path))
        if self.subcommand == "fit":
            self._check_log_root_writable()

    def _checked_checkpoint(self, ckpt_path: str) -> Path:
        """The checkpoint file ``--ckpt_path`` means, verified to be one of this model."""
        if ckpt_path == "last":
            path = find_last_checkpoint(self.trainer)
            if path is None:
                raise CheckpointError(
                    f"--ckpt_path last: no last.ckpt under {self._log_root()} to resume; "
                    "drop --ckpt_path to start a new run"
                )
        else:
            path = Path(ckpt_path)
        checkpoint = read_checkpoint(path)
        check_checkpoint_fits(path, checkpoint, self.model)
        if self.subcommand == "fit" and ckpt_path == "last":
            self._continue_run_folder(path, checkpoint["global_step"])
        return path

    def _log_root(self) -> Path:
        logger = self.trainer.logger
        root = getattr(logger, "root_dir", None) if logger is not None else None
        return Path(root or self.trainer.default_root_dir)

    def _check_log_root_writable(self) -> None:
        root = self._log_root()
        try:
            ensure_writable_dir(root)
        except OSError as err:
            raise UserError(
                f"cannot write run outputs to {root} ({err}); pass a writable "
                "--trainer.default_root_dir"
            ) from None

    def _continue_run_folder(self, checkpoint: Path, global_step: int) -> None:
        """Log into the resumed run's own ``version_N`` so its curves continue in TensorBoard."""
        logger = self.trainer.logger
        run_dir = checkpoint.parent.parent
        if not isinstance(logger, TensorBoardLogger) or run_dir.parent != Path(logger.root_dir):
            return
        # TensorBoardLogger only takes the version in its constructor; nothing has read it yet.
        logger._version = run_dir.name
        # Hide what the stopped run logged after this checkpoint, so no step appears twice.
        logger._kwargs["purge_step"] = global_step + 1

    def before_fit(self) -> None:
        self._check_inputs()

    def before_validate(self) -> None:
        self._check_inputs()

    def before_test(self) -> None:
        self._check_inputs()

    def before_predict(self) -> None:
        self._check_inputs()

    def after_fit(self) -> None:
        """Evaluate the best checkpoint on the official test split, as the tutorial does."""
        if self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def main(args: list[str] | None = None) -> None:
    """Command-line entry point; ``args`` replaces ``sys.argv[1:]`` (tests pass a list).

    Errors a user can fix print one line and exit non-zero; set FASHION_LIGHTNING_DEBUG=1 for
    the traceback.
    """
    try:
        FashionCLI(
            ImageClassifier,
            FashionMNISTDataModule,
            args=args,
            save_config_callback=SaveRunConfig,
        )
    except UserError as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except SIGTERMException:
        # Lightning exits 0 on SIGTERM outside training; a scheduler would read that as success
        print("error: stopped by SIGTERM", file=sys.stderr)
        sys.exit(143)
