"""The loop of optimizer steps a run trains in: the project's (the model's manual
optimization, ``model.steps_per_call`` steps a call of ``training_step``) or Lightning's (for
gradient accumulation and clipping), and what follows each step in the project's loop."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer, WeightAveraging

from fashion_lightning.checkpoints import Checkpoint
from fashion_lightning.errors import CheckpointError
from fashion_lightning.progress import StepProgressBar
from fashion_lightning.resume import ResumableTraining
from fashion_lightning.run_checkpoints import RunCheckpoint

# the checkpoint key that says whose loop of optimizer steps trained the run
LOOP_KEY = "optimizer_steps_loop"
# The hooks Lightning calls for every batch, or for every step of a call: a callback that
# has one expects one batch a call of training_step, and what it logs goes to Lightning's
# count of calls (LearningRateMonitor, DeviceStatsMonitor), which several steps a call leave
# behind the optimizer steps that the project's values are logged at.
PER_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
)
# What a callback class of your own sets to True when its per-batch hooks follow optimizer
# steps (trainer.global_step), not batches, so that groups of batches suit it.
STEPS_PER_CALL_SAFE = "steps_per_call_safe"
# callbacks with per-batch hooks that groups of batches suit: the project's own (they count
# optimizer steps), the weight average (updated after each step, see optimizer_step_done),
# Lightning's Timer (max_time: a stop at the end of a call is a clean state)
FOLLOW_OPTIMIZER_STEPS = (
    ResumableTraining,
    RunCheckpoint,
    StepProgressBar,
    WeightAveraging,
    Timer,
)


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
    elif trainer.overfit_batches > 0:  # Lightning replaces the order, and counts calls
        steps, why = 1, "--trainer.overfit_batches counts calls"
    elif per_batch := per_batch_callbacks(trainer.callbacks):
        _check_stopped_epoch_takes_one_batch_a_call(checkpoint, per_batch)
        verb = "expects" if len(per_batch) == 1 else "expect"
        steps, why = 1, f"{', '.join(per_batch)} {verb} one batch a call"
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


def per_batch_callbacks(callbacks: list[Callback]) -> list[str]:
    """The names of the callbacks that need one batch a call of ``training_step``: those with a
    per-batch hook (:data:`PER_BATCH_HOOKS`), except the ones that follow optimizer steps."""
    return [
        type(callback).__name__
        for callback in callbacks
        if not _follows_optimizer_steps(callback)
        and any(
            getattr(type(callback), hook) is not getattr(Callback, hook) for hook in PER_BATCH_HOOKS
        )
    ]


def _follows_optimizer_steps(callback: Callback) -> bool:
    if isinstance(callback, FOLLOW_OPTIMIZER_STEPS) or getattr(
        callback, STEPS_PER_CALL_SAFE, False
    ):
        return True
    if isinstance(callback, ModelCheckpoint):
        # saves at epoch ends and by time suit groups; every N steps would miss the multiples
        # that fall inside a call (global_step % N == 0). Lightning keeps N private: read with
        # a default that counts as "every N steps" (docs/development.md)
        return not getattr(callback, "_every_n_train_steps", 1)
    return False


def _check_stopped_epoch_takes_one_batch_a_call(
    checkpoint: Checkpoint | None, per_batch: list[str]
) -> None:
    """A run stopped in the middle of an epoch of several steps a call finishes that epoch so
    (Lightning counts the resumed epoch in calls): callbacks that need one batch a call
    cannot join it there."""
    stopped_with = None if checkpoint is None else _stopped_mid_epoch_with(checkpoint)
    if stopped_with is not None and stopped_with > 1:
        raise CheckpointError(
            f"--ckpt_path {checkpoint.path}: the run stopped in the middle of an epoch of "
            f"{stopped_with} optimizer steps a call, which it finishes that way, and "
            f"{', '.join(per_batch)} need one batch a call: continue it without them, and add "
            "them when it has stopped at an epoch's end"
        )


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
