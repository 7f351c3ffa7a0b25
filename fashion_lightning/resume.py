"""What makes a stop resumable: signals that stop at a clean step, and the state Lightning does
not keep (where in the epoch's order training was, the random generator that dropout draws
from). The checkpoint files themselves are :mod:`fashion_lightning.run_checkpoints`.

A run stopped and resumed in a new process ends as the uninterrupted run would, bit for bit
on CPU: the tests compare weights, optimizer state and logged values.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_warn

from fashion_lightning.data import EpochShuffleSampler
from fashion_lightning.errors import (
    CheckpointError,
    Stopped,
    TrainingInterrupted,
    speaks_for_the_command,
)
from fashion_lightning.run_checkpoints import RunCheckpoint, run_checkpoint, save_last_checkpoint
from fashion_lightning.stops import (
    FORWARDED,
    SIGNALS,
    at_once,
    end_process_at_once,
    ignore_late_signal,
    in_process_group,
    leave_process_group,
    say_received,
)


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
        self._launcher: Any = None  # what started this command's processes, if this one did
        self._fitting = True
        self._stopped: str | None = None  # what the stop said, once its checkpoint is written
        self.checkpoint_path: Path | None = None  # the checkpoint a run resumes, for messages

    def __getstate__(self) -> dict[str, Any]:
        # the launcher's processes (locks, pipes) never travel: a copy of this callback (the
        # processes ddp_spawn starts, a deepcopy of the model) passes no signal on
        return {**self.__dict__, "_launcher": None}

    # --- signals -------------------------------------------------------------------------

    def listen(self, launcher: Any = None, fitting: bool = True) -> None:
        """Take SIGINT and SIGTERM for this command (called before the Trainer runs);
        ``launcher``: the strategy's, which may start the processes that train (ddp_spawn);
        ``fitting``: the command trains (a stop then saves a checkpoint)."""
        self._fitting = fitting
        self._signal = None
        self._training = False
        self.stage_began = False
        self._launcher = launcher
        self._stopped = None
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (*SIGNALS, FORWARDED):
            previous = signal.signal(signum, self._on_signal)
            self._previous_handlers.setdefault(signum, previous)

    def stop_listening(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if signum == FORWARDED and not callable(handler):
                # late from the command's process, it must not end this one; and a function,
                # not SIG_IGN: one already pending would be "ignored due to race condition"
                handler = ignore_late_signal
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """In a process that ddp_spawn started, take the command's forwarded signal from the
        start (by default it would end the process)."""
        if multiprocessing.parent_process() is not None and (
            threading.current_thread() is threading.main_thread()
        ):
            signal.signal(FORWARDED, self._on_signal)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        """A stop ends this process: it leaves the process group of several processes now,
        together with the others after a stop they agreed on (a clean stop in training; under
        several processes a stop at once never gets here, it exits at once)."""
        if isinstance(exception, Stopped):
            leave_process_group(together=isinstance(exception, TrainingInterrupted))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """A process that ddp_spawn or ddp_fork started ends with its stage: it leaves the
        process group with the others."""
        if multiprocessing.parent_process() is not None:
            leave_process_group(together=True)

    def _take_back_signals(self) -> None:
        """Lightning installs its own SIGTERM handler when a stage starts (it would raise
        ``SIGTERMException`` in the middle of a validation): this one handles it instead.
        (Called when each stage starts, which is also when a checkpoint was fully restored.)"""
        self.stage_began = True
        if self._previous_handlers and threading.current_thread() is threading.main_thread():
            for signum in (*SIGNALS, FORWARDED):
                if signal.getsignal(signum) != self._on_signal:
                    signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._forward(signum):
            return
        if signum == FORWARDED:  # the command's own process was signalled
            if self._signal is not None or self._stopped is not None:
                return  # this process has it already: the whole group was signalled
            signum = signal.SIGTERM
        if self._stopped is not None:  # the stop is saved: end now, as it said
            end_process_at_once(self._stopped, signum, self.stop_started_processes)
        name = signal.Signals(signum).name
        if not self._training:  # not training: nothing new to save
            self.stop_started_processes()  # ddp's others, which may be waiting for this one
            if self.trained:  # the test after fit
                self._stopped = f"stopped by {name} while testing; training's checkpoints are kept"
            else:
                self._stopped = f"stopped by {name}; nothing was saved"
            raise Stopped(self._stopped, signum)
        if self._signal is not None:  # asked twice: stop now
            self._stopped = at_once(name)
            if in_process_group():
                end_process_at_once(self._stopped, signum, self.stop_started_processes)
            raise TrainingInterrupted(self._stopped, signum)
        self._signal = signum
        if speaks_for_the_command():
            say_received(name)

    def stop_started_processes(self) -> None:
        """Under ddp, the command's process (process 0) ends the others it started: stopping
        or failing alone, it would leave them waiting for it in a collective, or failing with
        gloo's traceback when it goes (and failing alike, they would say its error again)."""
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher.kill(signal.SIGKILL)

    def _forward(self, signum: int) -> bool:
        """In the command's own process, while processes it started train or evaluate: pass
        the signal on to them and wait for them to stop (they write the checkpoint). A second
        signal is passed on as itself, which stops them at once."""
        if (
            signum == FORWARDED
            or multiprocessing.parent_process() is not None  # a started process itself
            or not isinstance(self._launcher, _MultiProcessingLauncher)
            or not any(proc.is_alive() for proc in self._launcher.procs)
        ):
            return False
        first = self._signal is None
        self._signal = signum if first else self._signal
        self._launcher.kill(FORWARDED if first else signum)
        if first and self._fitting:  # (an evaluation stops at once: nothing to save)
            say_received(signal.Signals(signum).name)
        return True

    @property
    def signal_received(self) -> int | None:
        """The signal this process received and has not yet stopped for."""
        return self._signal

    def _agreed_signal(self, trainer: L.Trainer) -> int | None:
        """The signal that stops training now, the same in every process: under several
        processes, any process's (each asks at the same batches, so all stop at the same one;
        a signal to one process alone, the command's own under ddp, stops them all)."""
        signum = self._signal or 0
        if trainer.world_size > 1:
            mine = torch.tensor(signum, device=trainer.strategy.root_device)
            if in_process_group():
                torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX)
            else:  # a strategy of its own kind (Lightning's reduce adds a barrier before it)
                mine = trainer.strategy.reduce(mine, reduce_op="max")
            signum = int(mine)
        return signum or None

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
        _check_images_done(done, trainer, self.checkpoint_path)
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
        signum = self._agreed_signal(trainer)
        if signum is not None:  # landed at the end of the previous epoch
            where = f"after epoch {trainer.current_epoch}"  # (counted from 1, as checkpoints)
            self._stop(trainer, signum, where, at_epoch_end=True)

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
        signum = self._agreed_signal(trainer) if self._can_stop_after(trainer, batch_idx) else None
        if signum is not None:
            where = f"at epoch {trainer.current_epoch + 1}, batch {batch_idx + 1}"
            try:
                self._stop(trainer, signum, where)
            except TrainingInterrupted as stopping:
                # Lightning writes this batch's logged values after this hook: stop just after
                self._stopping = stopping

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_finished = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = False
        signum = self._agreed_signal(trainer)
        if signum is not None:  # the signal came during the last epoch's end
            self._stop(trainer, signum, "after the last epoch", at_epoch_end=True)

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

    def _stop(
        self, trainer: L.Trainer, signum: int, where: str, at_epoch_end: bool = False
    ) -> None:
        callback = run_checkpoint(trainer)
        if (
            at_epoch_end
            and isinstance(callback, RunCheckpoint)
            and callback.written_step == trainer.global_step
        ):
            path = Path(callback.last_model_path)  # the epoch's end wrote it: Lightning's own state
        else:
            path = save_last_checkpoint(trainer)
        self._signal = None
        advice = "Continue with the same command and --ckpt_path last"
        if getattr(callback, "save_weights_only", False):
            advice = (
                "It holds the weights only (--checkpoint.save_weights_only), which validate, "
                "test and predict take: training cannot continue from it"
            )
        stopped = TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} {where} (step {trainer.global_step}); "
            f"saved {path}",
            signum,
            advice=advice,
        )
        self._stopped = str(stopped)  # the command still listens: a signal now ends it at once
        raise stopped

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "images_done": self._images_done,
            "epoch_finished": self._epoch_finished,
            "rng": rng_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_at = dict(state_dict)


def _check_images_done(done: int, trainer: L.Trainer, path: Path | None) -> None:
    """CheckpointError unless the images done of the resumed epoch fit in an epoch of this run
    (more would end the epoch at once: a resume that silently trains less)."""
    data = trainer.datamodule
    counts = getattr(data, "training_batches", None)
    if not callable(counts):
        return
    epoch = counts(trainer) * data.batch_size
    if done > epoch:
        raise CheckpointError(
            f"--ckpt_path {path}: callbacks.ResumableTraining.images_done: {done} images of "
            f"its epoch were done, more than the {epoch} of an epoch of this run "
            "(limit_train_batches smaller than the stopped run's, or a crafted checkpoint); "
            "nothing was run"
        )


def _images_done(resume: dict[str, Any], trainer: L.Trainer) -> int:
    """Images of the epoch's order done when the checkpoint was written (checkpoints of
    earlier versions count batches)."""
    if "images_done" in resume:
        return resume["images_done"]
    batch_size = getattr(trainer.datamodule, "batch_size", 0)
    return resume.get("batches_done", 0) * batch_size
