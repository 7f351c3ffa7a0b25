"""The loop of optimizer steps a run trains in: the project's (the model's manual
optimization, ``model.steps_per_call`` steps a call of ``training_step``) or Lightning's (for
gradient accumulation and clipping), and what follows each step in the project's loop."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging

from fashion_lightning.checkpoints import Checkpoint
from fashion_lightning.errors import CheckpointError
from fashion_lightning.resume import ResumableTraining

# the checkpoint key that says whose loop of optimizer steps trained the run
LOOP_KEY = "optimizer_steps_loop"


def choose_training_loop(model: Any, trainer: L.Trainer, checkpoint: Checkpoint | None) -> None:
    """Train ``model`` in the project's loop, unless the run needs Lightning's (gradient
    accumulation or clipping) or began in it. Where several steps a call cannot give the same
    run as one, this run makes one, and says so: ``steps_per_call`` changes the speed, never
    the result."""
    asked = model.steps_per_call
    lightning = trainer.accumulate_grad_batches > 1 or bool(trainer.gradient_clip_val)
    steps, why = asked, ""
    recorded = None if checkpoint is None else checkpoint.contents.get(LOOP_KEY)
    if checkpoint is not None and recorded is None:
        lightning, why = True, "the run began in Lightning's loop (an earlier version)"
    elif recorded is not None and (recorded == "lightning") != lightning:
        raise CheckpointError(
            f"--ckpt_path {checkpoint.path}: the run was trained "
            f"{'with' if recorded == 'lightning' else 'without'} gradient accumulation or "
            "clipping, this command would train the other way; resume with its own config"
        )
    if lightning:
        steps, why = 1, why or "gradient accumulation and clipping are Lightning's"
    elif not _validates_at_epoch_ends_only(trainer):
        steps, why = 1, "a validation within an epoch comes after a batch, not a call"
    elif isinstance(trainer.limit_train_batches, float) and trainer.limit_train_batches < 1:
        steps, why = 1, "--trainer.limit_train_batches is a fraction of the calls"
    elif checkpoint is not None:
        stopped_with = _stopped_mid_epoch_with(checkpoint)
        if stopped_with is not None and stopped_with != asked:
            steps, why = stopped_with, "the stopped epoch continues as it began"
    if steps != asked:
        print(
            f"note: --model.steps_per_call {asked}: this run makes {steps} optimizer "
            f"step{'s' if steps > 1 else ''} a call ({why}); the result is the same",
            file=sys.stderr,
        )
    model.steps_per_call = steps
    model.automatic_optimization = lightning


def _validates_at_epoch_ends_only(trainer: L.Trainer) -> bool:
    interval = trainer.val_check_interval  # a float is a share of the epoch, an int batches
    at_ends = isinstance(interval, float) and interval == 1.0
    return at_ends and trainer.check_val_every_n_epoch is not None


def _stopped_mid_epoch_with(checkpoint: Checkpoint) -> int | None:
    """The ``steps_per_call`` of a run stopped in the middle of an epoch (Lightning counts a
    resumed epoch in calls), or None."""
    state = (checkpoint.contents.get("callbacks") or {}).get("ResumableTraining") or {}
    done = state.get("images_done") or state.get("batches_done")
    if state.get("epoch_finished", True) or not done:
        return None
    return checkpoint.contents.get("hyper_parameters", {}).get("steps_per_call", 1)


def optimizer_step_done(trainer: L.Trainer, pl_module: L.LightningModule, images: int) -> None:
    """What follows every optimizer step of the project's loop: Lightning calls the
    callbacks' ``on_train_batch_end`` once per call, so the per-step work runs here, as one
    step a call would run it: the count of images a resume continues after, and the weight
    average's update."""
    for callback in trainer.callbacks:
        if isinstance(callback, ResumableTraining):
            callback.on_optimizer_step_done(trainer, images)
        elif isinstance(callback, WeightAveraging):
            # its own hook, which updates once for each new optimizer step; Lightning's call at
            # the end of the call then finds nothing new
            callback.on_train_batch_end(trainer, pl_module, None, None, 0)
