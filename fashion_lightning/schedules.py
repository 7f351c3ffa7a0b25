"""The optimizer and the learning-rate schedule of the model: how they are built, how long a
schedule runs, and when the project's own loop steps an epoch's scheduler (Lightning steps
schedulers itself only in its own loop, not with manual optimization)."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.optim.lr_scheduler import ReduceLROnPlateau

from fashion_lightning.errors import UserError


def plateau_monitor(lr_scheduler: Any, default: str) -> str | None:
    """The metric a plateau scheduler (``ReduceLROnPlateau``) follows: Lightning's class names
    its own ``monitor``, torch's takes ``default``; None for any other scheduler."""
    built = scheduler_class(lr_scheduler)
    if built is None or not issubclass(built, ReduceLROnPlateau):
        return None
    return getattr(lr_scheduler, "keywords", {}).get("monitor") or default


def scheduler_class(lr_scheduler: Any) -> type | None:
    """The class a scheduler argument builds: a class, a ``functools.partial`` of one, or
    jsonargparse's partial, which holds it among its arguments."""
    wrapped = (getattr(lr_scheduler, "func", None), *getattr(lr_scheduler, "args", ()))
    return next((c for c in (lr_scheduler, *wrapped) if isinstance(c, type)), None)


def configure_optimizers(model: Any) -> Any:
    """The model's optimizer, and its scheduler with when it steps (LightningModule's
    ``configure_optimizers``)."""
    optimizer = model.optimizer(model.parameters())
    if model.lr_scheduler is None:
        return optimizer
    scheduler = make_scheduler(model, optimizer)
    config = {"scheduler": scheduler, "interval": model.scheduler_interval}
    monitor = model.plateau_monitor()
    if monitor is not None:  # for Lightning's own loop (accumulation, clipping), which steps it;
        # an epoch without a validation has no value: Lightning then warns and waits
        config.update(monitor=monitor, strict=False)
    return {"optimizer": optimizer, "lr_scheduler": config}


def make_scheduler(model: Any, optimizer: Any, total_steps: int | None = None) -> Any:
    """The model's ``lr_scheduler`` for ``optimizer``; a schedule of fixed length given none
    (OneCycleLR without ``total_steps``) spans ``total_steps``, by default the whole run."""
    extra = {}
    given = getattr(model.lr_scheduler, "keywords", {})  # jsonargparse gives a partial
    if "total_steps" in given and given["total_steps"] is None and given.get("epochs") is None:
        extra["total_steps"] = total_steps or planned_steps(model)  # OneCycleLR
    return model.lr_scheduler(optimizer, **extra)


def step_at_epoch_end(model: Any, scheduler: Any) -> None:
    """Step an epoch's scheduler in the project's loop; a plateau scheduler with the value it
    follows, when the epoch measured one (a val/* value needs a validation in the epoch)."""
    if scheduler is None:
        return
    monitor = model.plateau_monitor()
    if monitor is None:
        scheduler.step()
        return
    value = model.trainer.callback_metrics.get(monitor)
    if value is not None and (model.validated_this_epoch or not monitor.startswith("val/")):
        scheduler.step(value)


def planned_steps(model: Any) -> int:
    """The optimizer steps this run makes: Lightning's estimate, which counts calls of
    ``training_step``, multiplied out when a call makes several steps."""
    trainer = model.trainer
    if model.automatic_optimization:
        return trainer.estimated_stepping_batches
    planned = trainer.datamodule.training_batches() * max(trainer.max_epochs or 0, 0)
    if trainer.max_steps >= 0:
        planned = min(planned, trainer.max_steps) if planned else trainer.max_steps
    return planned


def check_schedule_length(
    model: Any, trainer: L.Trainer, resumed: list[dict] | None = None
) -> None:
    """A schedule with a fixed length (OneCycleLR's ``total_steps``) cannot run past its end:
    a run resumed with more epochs than it began with would fail at that step with a
    traceback. Say so before training instead. ``resumed``: the schedules' states a resumed
    run restores (their length is the one that counts)."""
    for i, config in enumerate(trainer.lr_scheduler_configs):
        total = getattr(config.scheduler, "total_steps", None)
        if resumed and i < len(resumed) and isinstance(resumed[i].get("total_steps"), int):
            total = resumed[i]["total_steps"]
        planned = planned_steps(model) if config.interval == "step" else trainer.max_epochs
        if total is not None and total < planned:
            raise UserError(
                f"the learning-rate schedule ({type(config.scheduler).__name__}) spans "
                f"{total} {config.interval}s but this run trains {planned}: a resumed run "
                "cannot go past the schedule it began with; resume with the "
                "--trainer.max_epochs it began with, or start a new run"
            )
