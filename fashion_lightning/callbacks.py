"""What makes a training run survive being stopped: signals, exact resume, atomic checkpoints."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from fashion_lightning.data import EpochShuffleSampler
from fashion_lightning.errors import TrainingInterrupted

LAST_CHECKPOINT = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint next to its target, fsyncs it, then renames it into place.

    A ``kill -9`` at any moment leaves either the previous file or the new one, never a torn
    file. Lightning's own save writes a temporary file in the system temp folder and
    ``shutil.move``s it, which is a plain copy (not atomic) when that folder is on another file
    system, and is never fsynced.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if "://" in str(path):  # remote storage: keep Lightning's fsspec path
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            with partial.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        for orphan in path.parent.glob(f".{path.name}.*.part"):  # left by a killed process
            orphan.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` of this run goes (the checkpoint callback's folder once it is set up)."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath) / LAST_CHECKPOINT
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / LAST_CHECKPOINT


class ResumableTraining(Callback):
    """Stops cleanly on SIGINT/SIGTERM and makes a mid-epoch resume continue where it stopped.

    - Ctrl+C (SIGINT) or SIGTERM: the current batch finishes, ``last.ckpt`` of exactly that
      state is written, and training stops with exit code 130 / 143. (Lightning alone raises
      KeyboardInterrupt wherever Ctrl+C lands and exits 1, and exits 0 on SIGTERM, which a
      scheduler reads as success.) A second Ctrl+C stops at once, without a checkpoint.
    - It saves how many batches of the current epoch are done; on resume the epoch's
      ``(seed, epoch)`` order continues from there, so the result is the one an uninterrupted
      run gives. (Lightning restarts the epoch's order unless the loader itself is resumable,
      and its one-batch prefetch makes a loader's own count one ahead of training.)
    """

    def __init__(self) -> None:
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._epoch = 0
        self._batches_done = 0
        self._resume_at: tuple[int, int] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._signal = None
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None:  # asked twice: stop now, as Ctrl+C normally does
            self._restore_handlers()
            raise KeyboardInterrupt
        self._signal = signum
        print(
            f"\n{signal.Signals(signum).name} received: finishing the current batch, then saving "
            "a checkpoint (send it again to stop at once).",
            file=sys.stderr,
            flush=True,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resume_at is None:
            return
        epoch, done = self._resume_at
        self._resume_at = None
        if epoch != trainer.current_epoch or not 0 < done < trainer.num_training_batches:
            return  # resumed at an epoch boundary: the new epoch starts from its beginning
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, EpochShuffleSampler):
            sampler.resume_within_epoch(done * loader.batch_size)
        else:
            rank_zero_warn(
                f"Resuming mid-epoch with a {type(sampler).__name__}: this epoch's order restarts, "
                "so the result will differ from an uninterrupted run."
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._epoch, self._batches_done = trainer.current_epoch, batch_idx + 1
        if self._signal is not None:
            self._stop(trainer, f"at epoch {trainer.current_epoch}, batch {batch_idx}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._signal is not None:  # the signal came during the last validation
            self._stop(trainer, "after the last epoch")

    def _stop(self, trainer: L.Trainer, where: str) -> None:
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        name = signal.Signals(self._signal).name
        raise TrainingInterrupted(
            f"stopped by {name} {where} (step {trainer.global_step}); saved {path}. "
            "Continue with the same command and --ckpt_path last",
            self._signal,
        )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_at = (state_dict["epoch"], state_dict["batches_done"])
