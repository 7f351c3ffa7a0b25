"""What a command prints besides its progress bar: a short summary of the run at its start, the
evaluation results, and only the library warnings that apply to it.

Each warning quieted here is one that this project has made irrelevant, matched by its exact
message (and, where it has one, its category and the module that issues it), and only while a
command of the project runs (:func:`quiet_what_does_not_apply`); a warning the project cannot
cause stays visible. ``tests/test_terminal.py`` runs a fit, a resume and an evaluation and
fails on any other warning, and on one of these coming back under another message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from fashion_lightning.run_checkpoints import checkpoint_folder

# Lightning's advertisement for a cloud logger, printed by every Trainer that has none of its
# own (logged, not warned: a logging filter on the logger that prints it quiets it)
TIP = "💡 Tip: For seamless cloud logging"
TIP_LOGGER = "lightning.pytorch.utilities.rank_zero"
# torch's word, under ddp_spawn, that it ends the other processes when one failed: the
# command says the failure itself, in one line
TERMINATING = "Terminating process %s via signal SIGTERM"
TERMINATING_LOGGER = "torch.multiprocessing.spawn"
# multiprocessing's resource tracker, a process of its own that ddp_spawn starts, warns as it
# ends about the semaphores of a started process that was killed (kill -9, out of memory),
# after the command has said what happened in one line
TRACKER_WARNING = "ignore:resource_tracker:UserWarning"
# (message, category, module that issues it) of warnings that never apply to this project's
# commands, with the pinned versions of constraints.txt
IRRELEVANT = (
    # Lightning 2.6.6 builds its loaders' tree spec with a class torch 2.14 deprecates: about
    # Lightning's own code, nothing a user of this project can act on
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
    ),
    # LightningCLI 2.6.6 calls jsonargparse 4.53 functions that 4.53 deprecates (shown where
    # deprecations are, in pytest and with -W)
    *(
        (rf"\s*{message}", DeprecationWarning, r"lightning\.pytorch\.cli")
        for message in (
            r"``ArgumentParser.add_instantiator`` was deprecated in v4.49.0",
            r"``instantiate_classes`` was deprecated in v4.49.0",
            r"skip_none parameter was deprecated in v4.49.0",
            r"By default only one JsonargparseDeprecationWarning per type is shown",
        )
    ),
    # ResumableTraining makes a mid-epoch resume exact; Lightning cannot see that
    (r"You're resuming from a checkpoint that ended before", Warning, ""),
)
# Lightning counts its logging interval in calls of training_step; with several optimizer
# steps a call (model.steps_per_call) the project logs every log_every_n_steps optimizer steps
LOGGING_INTERVAL = r"The number of training batches \(\d+\) is smaller than the logging interval"
# the data is in memory (on the GPU, on the device): worker processes would only add copies
FEW_WORKERS = r"The '\w+' does not have many workers which may be a bottleneck"
# validate, test and predict restore a checkpoint's bookkeeping that only fit uses
DIRPATH_CHANGED = r"The dirpath has changed from"


class _Not(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.message)


@contextlib.contextmanager
def quiet_what_does_not_apply() -> Iterator[None]:
    """While a command of the project runs: Lightning's tip, torch's word that it ends the
    processes ddp_spawn started, and the warnings of
    :data:`IRRELEVANT` are not shown; :class:`WarningsThatApply` adds those that depend on the
    run. Everything is as it was afterwards."""
    filters = [
        (logging.getLogger(TIP_LOGGER), _Not(TIP)),
        (logging.getLogger(TERMINATING_LOGGER), _Not(TERMINATING)),
    ]
    for logger, quiet in filters:
        logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            _ignore_irrelevant()
            yield
    finally:
        for logger, quiet in filters:
            logger.removeFilter(quiet)


def quiet_the_resource_tracker(trainer: L.Trainer) -> None:
    """Before ddp_spawn starts its processes: the resource tracker reads its warning filters
    from ``PYTHONWARNINGS`` when it starts (this process's filters do not reach it)."""
    if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        return
    current = os.environ.get("PYTHONWARNINGS", "")
    if TRACKER_WARNING not in current:
        os.environ["PYTHONWARNINGS"] = f"{current},{TRACKER_WARNING}".lstrip(",")


def _ignore_irrelevant() -> None:
    for message, category, module in IRRELEVANT:
        warnings.filterwarnings("ignore", message, category, module)


class WarningsThatApply(Callback):
    """Quiets the Lightning warnings that a run's settings make irrelevant, as the run starts
    (in ``setup``, after the data is set up and before Lightning would issue them); they stay
    quiet until :func:`quiet_what_does_not_apply`, which the command runs in, ends.

    - "The number of training batches (N) is smaller than the logging interval", when the
      model makes several optimizer steps a call: N counts calls, and the epoch's optimizer
      steps are not fewer than ``log_every_n_steps`` (where they are, it stays);
    - "does not have many workers", for ``data.num_workers`` 0: the data set is in memory;
    - "Checkpoint directory ... exists and is not empty", when a resumed run writes into the
      folder it resumes from: its own checkpoints are there;
    - "The dirpath has changed", in ``validate``, ``test`` and ``predict``, and in every
      process but process 0.
    """

    def __init__(self, checkpoint: Path | None = None) -> None:
        """``checkpoint``: the file the command starts from (``--ckpt_path``), if any."""
        self.checkpoint = checkpoint

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _ignore_irrelevant()  # again: ddp_spawn's processes start without this one's filters
        if stage != "fit" or not trainer.is_global_zero:  # (process 0 says it for all)
            warnings.filterwarnings("ignore", DIRPATH_CHANGED)
        datamodule = trainer.datamodule
        if getattr(datamodule, "num_workers", None) == 0:
            warnings.filterwarnings("ignore", FEW_WORKERS)
        if stage != "fit":
            return
        steps = getattr(datamodule, "training_batches", None)
        several = getattr(pl_module, "steps_per_call", 1) > 1
        if several and steps is not None and steps() >= trainer.log_every_n_steps:
            warnings.filterwarnings("ignore", LOGGING_INTERVAL)
        if not trainer.is_global_zero:  # Lightning warns on process 0 only
            return
        folder = checkpoint_folder(trainer)
        if folder and self.checkpoint and _same(self.checkpoint.parent, Path(folder)):
            message = f"Checkpoint directory {folder} exists and is not empty."
            warnings.filterwarnings("ignore", re.escape(message))


def _same(one: Path, other: Path) -> bool:
    return os.path.realpath(one) == os.path.realpath(other)


class RunSummary(Callback):
    """At the start of ``fit``, what a person reads of Lightning's model summary: the network,
    its number of parameters, and the folder the run writes to. (Lightning's table also lists
    each metric object, with 0 parameters.) The CLI uses it instead of Lightning's; add
    Lightning's ``ModelSummary`` or ``RichModelSummary`` callback for the whole table, and
    ``--trainer.enable_model_summary false`` prints neither."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = trainer.log_dir or trainer.default_root_dir  # a collective call under DDP
        if not trainer.is_global_zero:
            return
        parameters = sum(p.numel() for p in pl_module.parameters())
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        frozen = f", {parameters - trainable:,} of them frozen" if trainable < parameters else ""
        megabytes = sum(p.numel() * p.element_size() for p in pl_module.parameters()) / 1e6
        rank_zero_info(
            f"{network_text(pl_module)}: {parameters:,} parameters{frozen} ({megabytes:.1f} MB)\n"
            f"run folder: {_shown_path(folder)}"
        )


def network_text(module: nn.Module) -> str:
    """``MLP 784-512-512-10, ReLU, dropout 0.1``: the layers of the module's network."""
    network = getattr(module, "model", module)
    linear = [m for m in network.modules() if isinstance(m, nn.Linear)]
    if not linear:
        return type(network).__name__
    sizes = "-".join(str(n) for n in [linear[0].in_features, *(m.out_features for m in linear)])
    kinds = {type(m).__name__ for m in network.modules() if not list(m.children())}
    parts = [f"{type(network).__name__} {sizes}", *sorted(kinds - {"Linear", "Flatten", "Dropout"})]
    dropout = [m.p for m in network.modules() if isinstance(m, nn.Dropout)]
    if dropout:
        parts.append(f"dropout {dropout[0]:g}")
    return ", ".join(parts)


def _shown_path(path: str) -> str:
    """A path relative to the working folder when it is inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


# what the model logs to place its epoch values at the optimizer steps done (see
# ImageClassifier._log_at_optimizer_step): not a result
PLACEMENT = ("step", "epoch")


def results_table(results: list[dict[str, Any]], stage: str) -> str:
    """Lightning's table of a ``validate`` or ``test`` command's results, without the ``step``
    and ``epoch`` values that place them in the logs. Written here because Lightning's table
    (``Trainer.test(verbose=True)``) prints every value logged to the loggers and has no way
    to leave one out."""
    names = sorted({name for result in results for name in result} - set(PLACEMENT))
    columns = [f"DataLoader {i}" for i in range(len(results))]
    header = [f"{stage.capitalize()} metric", *columns]
    rows = [[name, *(_value(result.get(name)) for result in results)] for name in names]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    rule = "─" * (sum(widths) + 4 * (len(widths) - 1))
    lines = [rule, *(_line(row, widths) for row in [header]), rule]
    lines += [_line(row, widths) for row in rows]
    return "\n".join([*lines, rule])


def _value(value: Any) -> str:
    if value is None:
        return ""
    number = float(value)
    return f"{number:.4f}"


def _line(cells: list[str], widths: list[int]) -> str:
    first, *others = cells
    return "    ".join(
        [first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(others, widths[1:], strict=True))]
    )
