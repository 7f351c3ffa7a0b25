"""What makes a training run survive being stopped: signals, exact resume, checkpoints that are
written whole and always hold the latest state."""

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
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from fashion_lightning.data import EpochShuffleSampler
from fashion_lightning.errors import TrainingInterrupted
from fashion_lightning.runs import LAST_CHECKPOINT


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
        except Exception as err:
            # torch reports a failed write (a full disk) as "unexpected pos ..." with the
            # OSError only in its context: name the file and the cause instead
            cause = os_error_in(err)
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from err
        finally:
            partial.unlink(missing_ok=True)
        for orphan in path.parent.glob(f".{path.name}.*.part"):  # left by a killed process
            orphan.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError that ``error`` is or that caused it, if any (a failed write deep in a library)."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with two promises kept: ``last.ckpt`` is always the latest
    state, and the best checkpoint is always a validated one.

    - Since Lightning 2.6.0 ModelCheckpoint writes the last checkpoint only at a step where it
      also saved a top-k one, so with a monitor (``val/acc`` here) ``last.ckpt`` was a copy of
      the best. Here it is written after every validation (each epoch) and at every
      ``every_n_train_steps`` step, from step N on.
    - Lightning's ``every_n_train_steps`` saves also rank top-k checkpoints by the monitor's
      value from the last validation, so a state that was never validated could be kept as
      "best", and nothing at all is saved until the first validation. Here step saves write
      the last checkpoint only; the best is chosen at each validation, whichever trigger is set.
    - The folder is made absolute, so that a resume that spells it differently (``.`` or a
      relative ``--trainer.default_root_dir``) is recognised as the same run and keeps writing
      the same ``last.ckpt`` (Lightning compares the folder as a string).
    - Lightning 2.6.6 writes the last checkpoint at the end of a ``fast_dev_run``; here a debug
      run writes none.

    The protected methods used below are ModelCheckpoint's own steps (it has no public way to
    save the last checkpoint alone); the lightning pin in pyproject.toml guards them.
    """

    _last_saved_step = -1  # global step of the latest last checkpoint written by this run
    _ranked_step = -1  # global step of the latest top-k decision

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.dirpath and "://" not in str(self.dirpath):
            self.dirpath = os.path.realpath(self.dirpath)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        folder = state_dict.get("dirpath")
        if folder and "://" not in str(folder):  # checkpoints written with a relative folder
            state_dict = {**state_dict, "dirpath": os.path.realpath(folder)}
        super().load_state_dict(state_dict)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._train_time_interval is not None:  # time-based saves: Lightning's behaviour
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self._every_n_train_steps and trainer.global_step % self._every_n_train_steps == 0:
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_save_on_train_epoch_end(trainer):
            self._save_validated(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_validated(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)  # stopped between validations (max_steps, max_time...)

    def _skip(self, trainer: L.Trainer) -> bool:
        fitting = trainer.state.fn == TrainerFn.FITTING
        return bool(trainer.fast_dev_run) or not fitting or trainer.sanity_checking

    def _save_validated(self, trainer: L.Trainer) -> None:
        """After a validation: rank it among the best (every ``every_n_epochs`` epochs, each
        epoch when only step saves are configured), then write the last checkpoint."""
        if self._skip(trainer):
            return
        every = self._every_n_epochs or 1
        if (trainer.current_epoch + 1) % every == 0 and self._ranked_step != trainer.global_step:
            self._ranked_step = trainer.global_step
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        self._save_last(trainer)

    def _save_last(self, trainer: L.Trainer) -> None:
        if (
            self.save_last
            and not self._skip(trainer)
            and self._last_saved_step != trainer.global_step
        ):
            self.save_last_now(trainer)

    def save_last_now(self, trainer: L.Trainer) -> Path:
        """Write the last checkpoint of the current state at once (also a stop by signal)."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_saved_step = trainer.global_step
        return Path(self.last_model_path)


def save_last_checkpoint(trainer: L.Trainer) -> Path:
    """Write the run's last checkpoint now, where and as its checkpoint callback keeps it."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, RunCheckpoint) and callback.save_last:
        return callback.save_last_now(trainer)
    # no last checkpoint configured (--checkpoint.save_last false): still keep this state
    folder = callback.dirpath if callback is not None and callback.dirpath else None
    folder = folder or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
    path = Path(folder) / LAST_CHECKPOINT
    trainer.save_checkpoint(path)
    return path


class ResumableTraining(Callback):
    """Stops cleanly on SIGINT/SIGTERM and makes a mid-epoch resume continue where it stopped.

    - Ctrl+C (SIGINT) or SIGTERM: the current batch finishes, ``last.ckpt`` of exactly that
      state is written, and training stops with exit code 130 / 143. (Lightning alone raises
      KeyboardInterrupt wherever Ctrl+C lands and exits 1, and exits 0 on SIGTERM, which a
      scheduler reads as success.) A second Ctrl+C stops at once, without a checkpoint.
      validate, test and predict stop at once, with the same exit codes.
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
        if threading.current_thread() is not threading.main_thread():
            return
        handler = self._on_signal if stage == "fit" else self._stop_evaluation
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def _stop_evaluation(self, signum: int, frame: Any) -> None:
        """validate, test, predict: nothing to save, so stop at once, with the exit code the
        shell expects (Lightning exits 1 on Ctrl+C here, and 143 on SIGTERM)."""
        self._restore_handlers()
        name = signal.Signals(signum).name
        raise TrainingInterrupted(f"stopped by {name}; nothing was saved", signum)

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
        path = save_last_checkpoint(trainer)
        name = signal.Signals(self._signal).name
        raise TrainingInterrupted(
            f"stopped by {name} {where} (step {trainer.global_step}); saved {path}",
            self._signal,
            advice="Continue with the same command and --ckpt_path last",
        )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_at = (state_dict["epoch"], state_dict["batches_done"])
