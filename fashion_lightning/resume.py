"""What makes a stop resumable: signals that stop at a clean step, checkpoints that are written
whole and always hold the latest state, and the state Lightning does not keep (where in the
epoch's order training was, the random generator that dropout draws from).

A run stopped and resumed in a new process ends as the uninterrupted run would, bit for bit
on CPU: the tests compare weights, optimizer state and logged values.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from fashion_lightning.checkpoint_contents import CHECKPOINT_SUFFIX, url_problem
from fashion_lightning.checkpoints import LAST_CHECKPOINT, read_checkpoint
from fashion_lightning.data import EpochShuffleSampler
from fashion_lightning.errors import CheckpointError, Stopped, TrainingInterrupted
from fashion_lightning.files import atomic_write

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ResumableCheckpointIO(TorchCheckpointIO):
    """The checkpoint IO of every run: Lightning's, with three differences.

    - Each checkpoint is written next to its target, fsynced, then renamed into place
      (:func:`~fashion_lightning.files.atomic_write`): a ``kill -9`` at any moment leaves the
      previous file or the new one. (Lightning writes into the system's temporary folder and
      ``shutil.move``s the file, a plain copy when that folder is on another file system.)
    - A checkpoint is read once, as the bytes that were checked: the one the command read and
      checked (``--ckpt_path``) is handed to the Trainer as it was read; any other is read and
      checked by :func:`~fashion_lightning.checkpoints.read_checkpoint`, never with
      ``weights_only=False``, and never through fsspec (which opens any URL, ``data:`` too).
    - A checkpoint that a better one replaces is removed as a file, never a folder and never a
      URL the run did not write (Lightning removes with ``fs.rm(path, recursive=True)``).

    ``writer``: a checkpoint IO of the config (``trainer.plugins``, such as
    ``AsyncCheckpointIO``), which then writes and removes the files; reading stays here.
    """

    def __init__(self, writer: CheckpointIO | None = None) -> None:
        super().__init__()
        if writer is not None and getattr(writer, "checkpoint_io", True) is None:
            writer.checkpoint_io = ResumableCheckpointIO()  # AsyncCheckpointIO's own writer
        self.writer = writer
        self._preloaded: tuple[Path, dict[str, Any]] | None = None
        self.handed_over = False  # the checked checkpoint went to Lightning to be restored

    def preload(self, path: Path, contents: dict[str, Any]) -> None:
        self._preloaded = (path.resolve(), contents)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if self.writer is not None:
            self.writer.save_checkpoint(checkpoint, path, storage_options)
        elif url_problem(str(path)):  # remote storage: Lightning's own fsspec path
            super().save_checkpoint(checkpoint, path, storage_options)
        else:
            with atomic_write(path) as f:
                torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if self._preloaded is not None and Path(path).resolve() == self._preloaded[0]:
            contents, self._preloaded = self._preloaded[1], None
            self.handed_over = True
            return contents
        if url_problem(str(path)):
            raise CheckpointError(f"{path}: checkpoints are read from local files only")
        return read_checkpoint(Path(path), option="checkpoint").contents

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        name = str(path)
        if url_problem(name):  # in a remote --checkpoint.dirpath: a file this run wrote there
            (self.writer or super()).remove_checkpoint(path)
        elif name.endswith(CHECKPOINT_SUFFIX) and (os.path.islink(name) or os.path.isfile(name)):
            os.unlink(name)  # a link itself, not what it points to

    def teardown(self) -> None:
        if self.writer is not None:
            self.writer.teardown()  # AsyncCheckpointIO waits for its writes


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with two promises kept: ``last.ckpt`` is always the latest
    state, and the best checkpoint is always a validated one.

    - ``last.ckpt`` is written at the end of every training epoch (validated or not), after
      each validation, every ``every_n_train_steps`` optimizer steps and when training ends.
      (Lightning 2.6 writes it only where it also saves a top-k checkpoint, so with a monitor
      it was a copy of the best, and epochs without validation wrote none.)
    - The best checkpoints are ranked at validations only, as Lightning's ``every_n_epochs``
      does; step saves write ``last.ckpt`` alone. (Lightning's step saves rank a state that
      was never validated by the previous validation's value.)
    - The folder is made absolute, so that a resume that spells it differently (``.``) is the
      same run and keeps writing the same ``last.ckpt`` (Lightning compares it as a string).
    - A ``fast_dev_run`` writes no checkpoint.
    - ``{epoch}`` in a file name counts from 1, as the runs table and TensorBoard do
      (``epoch04-...`` is written in the fourth epoch; Lightning counts from 0).

    Only ModelCheckpoint's public hooks and ``Trainer.save_checkpoint`` are used.
    """

    def __init__(
        self,
        *args: Any,
        save_last: bool | None = None,
        every_n_train_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            save_last: Keep ``last.ckpt``: the latest state, what ``--ckpt_path last``
                resumes (Lightning's ``"link"`` is not offered: a link to an older checkpoint
                would resume from there).
            every_n_train_steps: Also write ``last.ckpt`` every this many optimizer steps,
                from step N on; the best checkpoints are still chosen at validations only.
        """
        super().__init__(*args, save_last=None, every_n_train_steps=None, **kwargs)
        self.keep_last = bool(save_last)
        self.step_interval = every_n_train_steps or 0
        self.written_step = -1  # global step of the last.ckpt written last by this run
        self.stopped_within_epoch = False  # should_stop ended training within an epoch
        self._stop_pending = False  # should_stop came within an accumulation window
        self._steps_saved = 0  # every_n_train_steps multiples reached

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.dirpath and "://" not in str(self.dirpath):
            self.dirpath = os.path.realpath(self.dirpath)

    def format_checkpoint_name(self, metrics: dict[str, Any], *args: Any, **kwargs: Any) -> str:
        if "epoch" in metrics:  # counted from 1
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return super().format_checkpoint_name(metrics, *args, **kwargs)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        folder = state_dict.get("dirpath")
        if folder and "://" not in str(folder):  # checkpoints written with a relative folder
            state_dict = {**state_dict, "dirpath": os.path.realpath(folder)}
        super().load_state_dict(state_dict)

    def _writes(self, trainer: L.Trainer) -> bool:
        fitting = trainer.state.fn == TrainerFn.FITTING
        return fitting and not trainer.sanity_checking and not trainer.fast_dev_run

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._steps_saved = trainer.global_step // max(self.step_interval, 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # time-based
        if trainer.should_stop or self._stop_pending:
            self._stop_within_epoch(trainer, batch_idx)
        if not self.step_interval:
            return
        # every N optimizer steps; with several steps a call (model.steps_per_call), at the
        # end of the call in which the step falls: a state Lightning resumes from consistently
        multiple = trainer.global_step // self.step_interval
        if multiple > self._steps_saved and trainer.global_step != self.written_step:
            self._write_last(trainer)
        self._steps_saved = max(self._steps_saved, multiple)

    def _stop_within_epoch(self, trainer: L.Trainer, batch_idx: int) -> None:
        """``trainer.should_stop`` ends training within an epoch (``max_time``, a callback),
        which Lightning then counts as done, so a resume from its end would skip the rest of
        the epoch: the last checkpoint is written here instead, at the first batch that ends
        an optimizer step (the stop waits for it), and is kept as the run's last state."""
        if batch_idx + 1 >= trainer.num_training_batches:  # the epoch ends: it stops whole
            trainer.should_stop, self._stop_pending = True, False
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            # within an accumulation window, whose gradients no checkpoint keeps: after it
            trainer.should_stop, self._stop_pending = False, True
            return
        trainer.should_stop, self._stop_pending = True, False
        if self.stopped_within_epoch:
            return
        self.stopped_within_epoch = True
        self._write_last(trainer)
        if trainer.is_global_zero and self.written_step == trainer.global_step:
            print(
                f"note: training stops within epoch {trainer.current_epoch} (step "
                f"{trainer.global_step}, --trainer.max_time or a callback); {self.last_model_path}"
                " continues it exactly with --ckpt_path last",
                file=sys.stderr,
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.is_last_batch:  # a validation within the epoch; the epoch's end writes
            self._write_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # should_stop after a validation within the epoch (EarlyStopping): it wrote the last
        self.stopped_within_epoch |= trainer.should_stop and not trainer.is_last_batch
        if not self.stopped_within_epoch:
            self._write_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.written_step and not self.stopped_within_epoch:
            self._write_last(trainer)  # stopped between epochs (max_steps...)

    def _write_last(self, trainer: L.Trainer) -> None:
        if self.keep_last and self._writes(trainer):
            self.write_last_now(trainer)

    def write_last_now(self, trainer: L.Trainer) -> Path:
        """Write the last checkpoint of the current state at once (also a stop by signal)."""
        path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        version = self.STARTING_VERSION
        # a folder several runs share (no logger): another run's last.ckpt is not ours; the
        # one this run resumed from is (also in a run folder moved since it was written)
        ours = {self.last_model_path, os.path.realpath(trainer.ckpt_path or "")}
        while self.file_exists(path, trainer) and path not in ours:
            path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST, ver=version)
            version += 1
        previous, self.last_model_path = self.last_model_path, path  # the file records it
        try:
            trainer.save_checkpoint(path, self.save_weights_only)
        except BaseException:
            self.last_model_path = previous
            raise
        self.written_step = trainer.global_step
        return Path(path)


def save_last_checkpoint(trainer: L.Trainer) -> Path:
    """Write the run's last checkpoint now, where and as its checkpoint callback keeps it."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, RunCheckpoint) and callback.keep_last:
        return callback.write_last_now(trainer)
    # no last checkpoint configured (--checkpoint.save_last false): still keep this state
    folder = callback.dirpath if callback is not None and callback.dirpath else None
    folder = folder or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
    path = Path(folder) / LAST_CHECKPOINT
    trainer.save_checkpoint(path)
    return path


def rng_state() -> dict[str, Any]:
    """The random generators that training draws from (dropout): CPU, and CUDA if in use."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableTraining(Callback):
    """Stops cleanly on SIGINT/SIGTERM and makes a resume continue exactly where it stopped.
    (One callback, longer than most: where a signal may stop a run depends on the training
    state this same callback keeps for the resume.)

    Stopping (Lightning alone raises KeyboardInterrupt wherever Ctrl+C lands and exits 1, and
    exits 0 on SIGTERM, or raises ``SIGTERMException`` in the middle of a validation):

    - during training, the run stops at the end of the first batch after the signal that
      completes an optimizer step (an accumulation window) and is followed by no validation;
      when the signal lands at the end of an epoch, after that epoch's validation, logging
      and checkpoint. ``last.ckpt`` of exactly that state is written and the command exits
      130 (SIGINT) or 143 (SIGTERM). A second signal stops at once, with nothing written.
    - before training starts (data, sanity check) and in ``validate``, ``test`` and
      ``predict`` there is nothing to save: the command stops at once, with the same codes.

    Exact resume: the checkpoint records the epoch, how many of its batches are done and the
    random generator's state; a resumed run continues the epoch's ``(seed, epoch)`` order from
    there and draws the same dropout masks. (Lightning restarts the epoch's order unless the
    loader itself is resumable, and keeps no random state.)
    """

    def __init__(self) -> None:
        self.stage_began = False  # this command has begun a sanity check, training or evaluation
        self.trained = False  # this command has trained (a test after fit may follow)
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._training = False
        self._epoch = 0
        self._images_done = 0  # of the current epoch's order
        self._epoch_finished = False
        self._resume_at: dict[str, Any] | None = None
        self._stopping: TrainingInterrupted | None = None  # raised at the next batch's start

    # --- signals -------------------------------------------------------------------------

    def listen(self) -> None:
        """Take SIGINT and SIGTERM for this command (called before the Trainer runs)."""
        self._signal = None
        self._training = False
        self.stage_began = False
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            previous = signal.signal(signum, self._on_signal)
            self._previous_handlers.setdefault(signum, previous)

    def stop_listening(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _take_back_signals(self) -> None:
        """Lightning installs its own SIGTERM handler when a stage starts (it would raise
        ``SIGTERMException`` in the middle of a validation): this one handles it instead.
        (Called when each stage starts, which is also when a checkpoint was fully restored.)"""
        self.stage_began = True
        if self._previous_handlers and threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signal.getsignal(signum) != self._on_signal:
                    signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self._training:  # not training: nothing new to save
            self.stop_listening()
            if self.trained:  # the test after fit
                raise Stopped(
                    f"stopped by {name} while testing; training's checkpoints are kept", signum
                )
            raise Stopped(f"stopped by {name}; nothing was saved", signum)
        if self._signal is not None:  # asked twice: stop now
            self.stop_listening()
            raise TrainingInterrupted(
                f"stopped by {name} at once, without a checkpoint of the last steps", signum
            )
        self._signal = signum
        print(
            f"\n{name} received: finishing the current step, then saving a checkpoint "
            "(send it again to stop at once).",
            file=sys.stderr,
            flush=True,
        )

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._take_back_signals()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._take_back_signals()

    def on_test_start(self, trainer, pl_module) -> None:
        self._take_back_signals()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._take_back_signals()

    # --- training ------------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Tell the data where the resumed epoch's order continues, before Lightning makes its
        first loader iterator (with worker processes, that iterator reads its first indices at
        once, before Lightning sets the epoch)."""
        resume = self._resume_at
        if resume is None:
            return
        epoch, done = resume["epoch"], _images_done(resume, trainer)
        if resume.get("epoch_finished", False):
            epoch, done = epoch + 1, 0
        # Lightning does not start a resumed epoch over (no on_train_epoch_start): count on
        self._epoch, self._images_done = epoch, done
        continue_order = getattr(trainer.datamodule, "continue_order", None)
        if callable(continue_order):
            continue_order(epoch, done)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_back_signals()
        self._training = self.trained = True
        resume, self._resume_at = self._resume_at, None
        if resume is None:
            return
        if "rng" in resume:
            set_rng_state(resume["rng"])
        mid_epoch = _images_done(resume, trainer) > 0 and not resume.get("epoch_finished", False)
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if mid_epoch and not isinstance(sampler, EpochShuffleSampler):
            # under DDP Lightning wraps the sampler to split it between the processes
            rank_zero_warn(
                f"Resuming mid-epoch with a {type(sampler).__name__}: this epoch's order restarts, "
                "so the result will differ from an uninterrupted run."
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch, self._images_done, self._epoch_finished = trainer.current_epoch, 0, False
        if self._signal is not None:  # landed at the end of the previous epoch
            self._stop(trainer, f"after epoch {trainer.current_epoch - 1}", at_epoch_end=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx) -> None:
        if self._stopping is not None:  # saved at the previous batch's end, then its logs went
            stopping, self._stopping = self._stopping, None
            raise stopping

    def on_optimizer_step_done(self, trainer: L.Trainer, images: int) -> None:
        """Count the images of a step that a call with several steps has just made."""
        self._images_done += images

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._epoch = trainer.current_epoch
        if pl_module.automatic_optimization:
            self._images_done += outputs["images"] if isinstance(outputs, dict) else len(batch[1])
        if self._signal is not None and self._can_stop_after(trainer, batch_idx):
            where = f"at epoch {trainer.current_epoch}, batch {batch_idx}"
            try:
                self._stop(trainer, where)
            except TrainingInterrupted as stopping:
                # Lightning writes this batch's logged values after this hook: stop just after
                self._stopping = stopping

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_finished = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = False
        if self._signal is not None:  # the signal came during the last epoch's end
            self._stop(trainer, "after the last epoch", at_epoch_end=True)

    @staticmethod
    def _can_stop_after(trainer: L.Trainer, batch_idx: int) -> bool:
        """Whether the state after this batch is one to stop in: an optimizer step is complete
        (gradients are not saved), it is not the epoch's last batch (the epoch's end follows:
        validation, logging), and no validation is due after it (it would be missing)."""
        done = batch_idx + 1
        if done >= trainer.num_training_batches:
            return False
        if done % trainer.accumulate_grad_batches:
            return False
        if not trainer.enable_validation or not sum(trainer.num_val_batches or [0]):
            return True
        every, epochs = trainer.val_check_batch, trainer.check_val_every_n_epoch
        if not isinstance(trainer.val_check_interval, (int, float)) or epochs is None:
            return False  # validation by time, or every N batches across epochs: wait for the end
        if every is None or every == float("inf"):
            return True  # validation at the epoch's end only
        return (trainer.current_epoch + 1) % epochs != 0 or done % int(every) != 0

    def _stop(self, trainer: L.Trainer, where: str, at_epoch_end: bool = False) -> None:
        callback = trainer.checkpoint_callback
        if (
            at_epoch_end
            and isinstance(callback, RunCheckpoint)
            and callback.written_step == trainer.global_step
        ):
            path = Path(callback.last_model_path)  # the epoch's end wrote it: Lightning's own state
        else:
            path = save_last_checkpoint(trainer)
        self.stop_listening()
        signum, self._signal = self._signal, None
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} {where} (step {trainer.global_step}); "
            f"saved {path}",
            signum,
            advice="Continue with the same command and --ckpt_path last",
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "images_done": self._images_done,
            "epoch_finished": self._epoch_finished,
            "rng": rng_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_at = dict(state_dict)


def _images_done(resume: dict[str, Any], trainer: L.Trainer) -> int:
    """Images of the epoch's order done when the checkpoint was written (checkpoints of
    earlier versions count batches)."""
    if "images_done" in resume:
        return resume["images_done"]
    batch_size = getattr(trainer.datamodule, "batch_size", 0)
    return resume.get("batches_done", 0) * batch_size
