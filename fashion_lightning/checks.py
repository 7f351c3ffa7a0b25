"""What a command checks before it runs, so that what would fail later (after a run folder
exists, with a traceback) is one line now."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging

from fashion_lightning.errors import ConfigError, UserError
from fashion_lightning.files import ensure_writable_dir


def check_optimizer(model: Any) -> None:
    """Build the optimizer once: a value torch refuses (a negative learning rate) is a
    one-line error before a run folder exists."""
    try:
        model.optimizer(model.parameters())
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--model.optimizer: {err}") from None


def check_writable(folder: Path, what: str, option: str) -> None:
    try:
        ensure_writable_dir(folder)
    except OSError as err:
        raise UserError(
            f"cannot write {what} to {folder} ({err}); pass a writable {option}"
        ) from None


def check_run_folders(trainer: L.Trainer, fitting: bool, logger_configured: bool) -> None:
    """The run's log root, and its checkpoint folder when it trains, can be written."""
    logger = trainer.logger
    root = getattr(logger, "root_dir", None) if logger is not None else None
    option = "--trainer.logger.save_dir" if logger_configured else "--trainer.default_root_dir"
    check_writable(Path(root or trainer.default_root_dir), "run outputs", option)
    callback = trainer.checkpoint_callback
    if fitting and callback is not None and callback.dirpath:
        check_writable(Path(callback.dirpath), "checkpoints", "--checkpoint.dirpath")


def check_accelerator(accelerator: Any) -> None:
    if not isinstance(accelerator, str) or accelerator.lower() not in ("gpu", "cuda", "mps"):
        return
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if not {"gpu": cuda or mps, "cuda": cuda, "mps": mps}[accelerator.lower()]:
        raise UserError(
            f"--trainer.accelerator {accelerator}: PyTorch sees no such device on this "
            f"machine (torch {torch.__version__}, CUDA available: {cuda}); use "
            "--trainer.accelerator auto or cpu, or a PyTorch build for your GPU"
        )


def check_callbacks(callbacks: list[Callback]) -> None:
    for callback in callbacks:
        if isinstance(callback, StochasticWeightAveraging):
            raise ConfigError(
                "--trainer.callbacks StochasticWeightAveraging: its average reaches neither the "
                "checkpoints nor the test; use --trainer.callbacks+=WeightAveraging (an equal "
                "average, as SWA's) or EMAWeightAveraging, which this project keeps end to end"
            )
