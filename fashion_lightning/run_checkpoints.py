"""The run's checkpoint files: :class:`RunCheckpoint` (``last.ckpt`` always the latest state,
the best always a validated one, a stop within an epoch kept as the run's last state) and the
checkpoint IO every run uses (files written whole, a checkpoint read once as it was checked,
replaced checkpoints removed as files only).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from fashion_lightning.checkpoint_contents import CHECKPOINT_SUFFIX, url_problem
from fashion_lightning.checkpoints import LAST_CHECKPOINT
from fashion_lightning.errors import CheckpointError, ConfigError
from fashion_lightning.files import atomic_write


class ResumableCheckpointIO(TorchCheckpointIO):
    """The checkpoint IO of every run: Lightning's, with three differences.

    - Each checkpoint is written next to its target, fsynced, then renamed into place
      (:func:`~fashion_lightning.files.atomic_write`): a ``kill -9`` at any moment leaves the
      previous file or the new one. (Lightning writes into the system's temporary folder and
      ``shutil.move``s the file, a plain copy when that folder is on another file system.)
    - A checkpoint is read once, as the bytes that were checked: the one the command read and
      checked (``--ckpt_path``) is handed to the Trainer as it was read; any other (a file
      Lightning wrote in this run and reads back) is read with ``weights_only=True`` whatever
      Lightning asks, and never through fsspec (which opens any URL, ``data:`` too).
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

    @classmethod
    def among(cls, plugins: list[Any]) -> ResumableCheckpointIO:
        """The checkpoint IO of a run whose config names ``plugins``: it reads every
        checkpoint, and the checkpoint IO they name, if any, writes."""
        writers = [p for p in plugins if isinstance(p, CheckpointIO)]
        if len(writers) > 1:
            raise ConfigError("--trainer.plugins: name one checkpoint IO at most")
        return cls(writer=writers[0] if writers else None)

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
        # a file Lightning wrote in this run and reads back (ddp_spawn's weights, the batch-size
        # finder's checkpoint): data alone, whatever weights_only Lightning passes
        return torch.load(path, map_location=map_location, weights_only=True)

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
                f"note: training stops within epoch {trainer.current_epoch + 1} (step "
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


def run_checkpoint(trainer: L.Trainer) -> RunCheckpoint | None:
    """The run's own checkpoint callback (``trainer.checkpoint_callback`` is the first of any
    kind, and a ModelCheckpoint a user adds to the config may come first)."""
    return next((c for c in trainer.callbacks if isinstance(c, RunCheckpoint)), None)


def checkpoint_folder(trainer: L.Trainer) -> str | None:
    """The folder the run's checkpoints go to, as ModelCheckpoint names it (asked of any
    process, alone: no collective call)."""
    callback = run_checkpoint(trainer)
    if callback is None:
        return None
    if getattr(callback, "dirpath", None):
        return str(callback.dirpath)
    root = trainer.loggers[0].log_dir if trainer.loggers else trainer.default_root_dir
    return os.path.join(root, "checkpoints") if root else None


def save_last_checkpoint(trainer: L.Trainer) -> Path:
    """Write the run's last checkpoint now, where and as its checkpoint callback keeps it."""
    callback = run_checkpoint(trainer)
    if callback is not None and callback.keep_last:
        return callback.write_last_now(trainer)
    # no last checkpoint configured (--checkpoint.save_last false): still keep this state
    folder = callback.dirpath if callback is not None and callback.dirpath else None
    folder = folder or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
    path = Path(folder) / LAST_CHECKPOINT
    trainer.save_checkpoint(path)
    return path
