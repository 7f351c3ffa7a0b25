"""What a command that fails says and leaves behind: one line for a failure the user can act
on (a full disk, a checkpoint Lightning could not restore), and a run folder that records
nothing this command did when it failed before anything ran."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer

from fashion_lightning.errors import (
    WRITE_ERRNOS,
    CheckpointError,
    UserError,
    first_line,
    write_failure,
)
from fashion_lightning.run_checkpoints import run_checkpoint
from fashion_lightning.run_folders import RunFolderLogger, SaveRunConfig


def command_failure(
    err: Exception, trainer: Trainer, subcommand: str, restoring: Any = None
) -> UserError | None:
    """``err`` as one line, or None: a failed write (it names the file, the cause and what
    is kept), or an error while Lightning restored the checkpoint ``restoring`` (a
    :class:`~fashion_lightning.checkpoints.Checkpoint`; None once the command ran), an entry
    no check foresaw."""
    failure = write_failure(
        err, f"the run outputs in {trainer.log_dir}", what_is_kept(trainer, subcommand)
    )
    if failure is not None or restoring is None or isinstance(err, UserError):
        return failure
    return CheckpointError(
        f"--ckpt_path {restoring.path}: Lightning could not restore it "
        f"({type(err).__name__}: {first_line(err)}); it is not a checkpoint this project "
        "wrote, or it was altered (nothing was run)"
    )


def what_is_kept(trainer: Trainer, subcommand: str) -> str:
    """What a user whose disk filled up still has, and what to do next."""
    if subcommand != "fit":
        return "free space and run again"
    callback = run_checkpoint(trainer)
    folder = Path(callback.dirpath) if callback is not None and callback.dirpath else None
    kept = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns) if folder else []
    if not kept:
        return "no checkpoint was written yet; free space and run again"
    return (
        f"the newest complete checkpoint is {kept[-1]}; free space, then continue with "
        "--ckpt_path last"
    )


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
            return Path(trainer.log_dir) / callback.config_filename
    return None


def quiet_write_errors_in_threads(args) -> None:
    """TensorBoard writes from a thread: its failed write (a full disk) surfaces again in the
    main thread, which reports it in one line; don't print the thread's traceback too."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRNOS:
        return
    threading.__excepthook__(args)
