"""Every error a user can cause and fix, and how it is printed: one line, ``error: ...``, and an
exit code (1, or 2 for a value that is refused, or 128 + the signal's number for a stop).

Set ``FASHION_LIGHTNING_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import multiprocessing
import os
import signal
import sys
import time
from typing import NoReturn, TypeVar

DEBUG_ENV = "FASHION_LIGHTNING_DEBUG"
# what a failed write of run outputs looks like (a full disk, a quota, a file-size limit)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}

E = TypeVar("E", bound=BaseException)


class UserError(RuntimeError):
    """Something in the input or the environment is wrong; the message says what and how to fix it."""

    exit_code = 1


class ConfigError(UserError):
    """A config value that a library refuses when it is used (torch's optimizers...); exit 2
    like the values refused while parsing."""

    exit_code = 2


class DataError(UserError):
    """FashionMNIST cannot be found or is damaged; the message names the file and the remedy."""


class CheckpointError(UserError):
    """``--ckpt_path`` names nothing usable: missing, damaged, crafted, or of another model."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; training stopped before the bad step was applied."""


class Stopped(UserError):
    """SIGINT or SIGTERM stopped the command; exit code 130 or 143, as a shell expects."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class TrainingInterrupted(Stopped):
    """SIGINT or SIGTERM stopped training, after a checkpoint of the exact state was written
    (or, on a second signal, at once)."""

    def __init__(self, stopped: str, signum: int, advice: str = "") -> None:
        super().__init__(f"{stopped}. {advice}" if advice else stopped, signum)
        self.stopped = stopped  # what happened, without the advice (the search gives its own)


class SearchError(UserError):
    """The search's own input is wrong (flags, search file, storage); exit 2 like a parse error."""

    exit_code = 2


class FitArgumentsError(UserError):
    """The fit command line refused the arguments a trial would run with."""

    exit_code = 2


class SearchStopped(Stopped):
    """SIGINT or SIGTERM reached the search; the running trials are queued again."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"stopped by {signal.Signals(signum).name}", signum)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def first_line(err: BaseException) -> str:
    """A library error's first line (SQLAlchemy's messages run on with SQL and links)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def cause_of(error: BaseException | None, kind: type[E]) -> E | None:
    """The exception of type ``kind`` that ``error`` is or that (in)directly caused it, if any:
    a failed write deep in a library, a missing module behind a callback's import."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error


def write_failure(err: BaseException, where: str, kept: str) -> UserError | None:
    """A failed write (a full disk, a quota) anywhere under ``err`` as one line that names the
    file, the cause and what is kept; None if ``err`` is no failed write."""
    cause = cause_of(err, OSError)
    if cause is None or cause.errno not in WRITE_ERRNOS:
        return None
    return UserError(f"cannot write {cause.filename or where}: {cause.strerror}; {kept}")


def out_of_memory(err: BaseException) -> UserError | None:
    """torch's failed allocation (CPU or GPU) anywhere under ``err`` as one line, or None."""
    cause = cause_of(err, RuntimeError)
    text = first_line(cause) if cause is not None else ""
    if "can't allocate memory" not in text and "out of memory" not in text.lower():
        return None
    return UserError(
        f"out of memory ({text[:200]}); lower --model.hidden_size or --data.batch_size, or use "
        "a machine with more memory"
    )


def parse_error(prog: str, message: str) -> NoReturn:
    """How both commands refuse their command line: one line naming ``--help``, exit 2."""
    print(f"error: {one_line(message)} (see: {prog} --help)", file=sys.stderr)
    sys.exit(2)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with its error as one line like the fit command's (not usage, then the error)."""

    def error(self, message: str) -> NoReturn:
        parse_error(self.prog, message)


def speaks_for_the_command() -> bool:
    """Whether this process says what the command does: the command's own process, not one
    that ddp started (``LOCAL_RANK`` 1, 2...) or that ddp_spawn started (a child of it)."""
    return multiprocessing.parent_process() is None and os.environ.get("LOCAL_RANK", "0") == "0"


def say_error(err: BaseException | str) -> None:
    print(f"error: {one_line(err)}", file=sys.stderr, flush=True)


def exit_with(err: BaseException, exit_code: int | None = None) -> NoReturn:
    """Print ``err`` as one line and exit with its code (the traceback under DEBUG_ENV)."""
    if os.environ.get(DEBUG_ENV):
        raise err
    if isinstance(err, Stopped):  # the same in every process: process 0 says it for all
        if speaks_for_the_command():
            say_error(err)
    else:
        if not speaks_for_the_command():
            _leave_it_to_process_zero()
        say_error(err)
    sys.exit(exit_code if exit_code is not None else getattr(err, "exit_code", 1))


def _leave_it_to_process_zero(patience: float = 10.0) -> None:
    """In a process that ddp started (``LOCAL_RANK`` 1, 2...): wait for process 0, which ends
    this one when it fails too. Every process reads the same config, checkpoint and data, so
    their errors are mostly one and the same, and process 0 says it once. An error of this
    process alone is said after ``patience`` seconds, or at once should process 0 end."""
    parent, deadline = os.getppid(), time.monotonic() + patience
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.05)
