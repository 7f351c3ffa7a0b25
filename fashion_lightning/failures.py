"""What a command that fails says and leaves behind: one line for a failure the user can act
on (a full disk, a checkpoint Lightning could not restore), and a run folder that records
nothing this command did when it failed before anything ran."""

from __future__ import annotations

import pickle
import re
import threading
import traceback
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from fashion_lightning import errors
from fashion_lightning.errors import (
    WRITE_ERRNOS,
    CheckpointError,
    ConfigError,
    DataError,
    UserError,
    first_line,
    write_failure,
)
from fashion_lightning.run_checkpoints import checkpoint_folder
from fashion_lightning.run_folders import RunFolderLogger, SaveRunConfig


def command_failure(
    err: Exception, trainer: Trainer, subcommand: str, restoring: Any = None
) -> UserError | None:
    """``err`` as one line, or None: a failed write (it names the file, the cause and what
    is kept), or an error while Lightning restored the checkpoint ``restoring`` (a
    :class:`~fashion_lightning.checkpoints.Checkpoint`; None once the command ran), an entry
    no check foresaw."""
    if isinstance(err, ProcessExitedException):  # kill -9, the kernel's out-of-memory killer
        return UserError(
            f"{first_line(err)} (ended from outside: killed, or out of memory); "
            f"{what_is_kept(trainer, subcommand, remedy='')}"
        )
    failure = (
        error_in_started_processes(err)
        or not_copied(err, trainer)
        or write_failure(
            err, f"the run outputs in {_log_dir(trainer)}", what_is_kept(trainer, subcommand)
        )
    )
    if (
        failure is not None
        or restoring is None
        or isinstance(err, UserError)
        or not _raised_while_restoring(err)
    ):
        return failure
    return CheckpointError(
        f"--ckpt_path {restoring.path}: Lightning could not restore it "
        f"({type(err).__name__}: {first_line(err)}); it is not a checkpoint this project "
        "wrote, or it was altered (nothing was run)"
    )


# the last line of the traceback of a process that ddp_spawn or ddp_fork started, when one
# of the project's errors or a value Lightning refused ended it
LAST_LINE = re.compile(
    r"^(fashion_lightning\.errors\.(\w+)"
    r"|lightning\.fabric\.utilities\.exceptions\.MisconfigurationException): (.*)$",
    re.MULTILINE,
)
# refused before the stage begins: nothing ran
REFUSALS = (CheckpointError, ConfigError, DataError, MisconfigurationException)


def error_in_started_processes(err: Exception) -> UserError | None:
    """The error that ended the processes ddp_spawn or ddp_fork started, as this process's own
    one line, or None. torch hands it over as the text of its traceback
    (``ProcessRaisedException``); the project's errors and Lightning's refusal of a value are
    recognised by their last line (a stop: :func:`~fashion_lightning.stops.stop_in_processes`)."""
    if not isinstance(err, ProcessRaisedException):
        return None
    found = LAST_LINE.findall(err.msg)
    if not found:
        return None
    _, name, message = found[-1]
    kind = getattr(errors, name, None) if name else ConfigError  # (as main() says Lightning's)
    if not (isinstance(kind, type) and issubclass(kind, UserError)) or issubclass(
        kind, errors.Stopped
    ):
        return None
    return kind(message)


def not_copied(err: Exception, trainer: Trainer) -> ConfigError | None:
    """ddp_spawn's refusal to start: it copies the run into each new process by pickling it,
    and some objects cannot be (Lightning's ``EMAWeightAveraging`` keeps a local function)."""
    launcher = trainer.strategy.launcher
    if not (
        isinstance(launcher, _MultiProcessingLauncher)
        and isinstance(err, (AttributeError, TypeError, pickle.PicklingError))
        and "pickle" in str(err)
    ):
        return None
    return ConfigError(
        "--trainer.strategy ddp_spawn copies the run into each process it starts, and cannot "
        f"copy part of it ({first_line(err)}); use --trainer.strategy ddp or ddp_fork, which "
        "do not copy it"
    )


def ran_anything(trainer: Trainer, began: bool, failure: BaseException | None) -> bool:
    """Whether a failed command ran anything of its stage (training, evaluation): ``began``
    tells for this process. The processes ddp_spawn starts run the stage, and their failure
    only tells by its kind: after a refusal of the input nothing ran, anything else may have
    written checkpoints that must stay."""
    if began or not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        return began
    return not isinstance(failure, REFUSALS)


def end_their_progress_bar(trainer: Trainer) -> None:
    """End the line that the progress bar of the processes ddp_spawn started may have left
    (they end without Lightning's ``on_exception``), so that the command's error starts one of
    its own."""
    if trainer.progress_bar_callback is not None:
        print(flush=True)


def what_is_kept(trainer: Trainer, subcommand: str, remedy: str = "free space") -> str:
    """What a user whose run failed (a full disk: ``remedy``) still has, and what to do next."""
    first = f"{remedy} and " if remedy else ""
    if subcommand != "fit":
        return f"{first}run again"
    folder = checkpoint_folder(trainer)  # (set in the processes ddp_spawn started, not here)
    folder = Path(folder) if folder else None
    kept = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns) if folder else []
    if not kept:
        return f"no checkpoint was written yet; {first}run again"
    then = f"{remedy}, then continue" if remedy else "continue"
    return f"the newest complete checkpoint is {kept[-1]}; {then} with --ckpt_path last"


def give_back_run_folder(trainer: Trainer, ran: bool) -> None:
    """After a failure: a run folder this command claimed goes if nothing was logged into it;
    if the command failed before anything ran (a sanity check, training or evaluation), what
    it wrote goes (its config records nothing)."""
    logger = trainer.logger
    if not isinstance(logger, RunFolderLogger):
        return
    if ran:
        logger.release_unused_folder()
    else:
        logger.forget_this_command(_config_file(trainer))


def _config_file(trainer: Trainer) -> Path | None:
    """The config file this command saved into its run folder, if it saved one."""
    for callback in trainer.callbacks:
        if isinstance(callback, SaveRunConfig) and callback.already_saved:
            return Path(_log_dir(trainer)) / callback.config_filename
    return None


def _raised_while_restoring(err: BaseException) -> bool:
    """Whether Lightning's checkpoint connector, which restores a checkpoint into the Trainer,
    raised ``err`` (by its traceback: between the restore and the stage's first hook, Lightning
    also sets up the loaders, whose errors are no checkpoint's)."""
    return any(
        Path(frame.f_code.co_filename).name == "checkpoint_connector.py"
        for frame, _ in traceback.walk_tb(err.__traceback__)
    )


def _log_dir(trainer: Trainer) -> str:
    """``trainer.log_dir`` without its broadcast: a process that fails may fail alone, and a
    collective call would wait for the others forever."""
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    return logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir


def quiet_write_errors_in_threads(args) -> None:
    """TensorBoard writes from a thread: its failed write (a full disk) surfaces again in the
    main thread, which reports it in one line; don't print the thread's traceback too."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRNOS:
        return
    threading.__excepthook__(args)
