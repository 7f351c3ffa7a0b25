"""How a stop reaches every process of a command and ends it: the signals the command takes,
the one it passes to the processes it started, how their stop comes back to it, and how a
process of several ends at once or leaves their group.

:class:`~fashion_lightning.resume.ResumableTraining` decides when a run stops; this module is
what it, and the CLI, need of processes and signals.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from typing import Any, NoReturn

import torch
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from fashion_lightning.errors import Stopped, TrainingInterrupted, say_error, speaks_for_the_command

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What the command's own process sends the processes it started (ddp_spawn, ddp_fork) when it is
# signalled: stop as after a first signal. Not the signal itself: when the whole process group
# is signalled (Ctrl+C), each process has it already, and a second one would stop it at once.
FORWARDED = signal.SIGUSR2


# the last line of a started process's traceback, when the project's stop ended it
STOP_LINE = re.compile(
    r"^fashion_lightning\.errors\.(Stopped|TrainingInterrupted): stopped by (SIG[A-Z]+)(.*)$",
    re.MULTILINE,
)


def stop_in_processes(err: BaseException, signum: int | None) -> Stopped | None:
    """The stop of the processes that ddp_spawn or ddp_fork started, as this command's own, or
    None if ``err`` is no such stop. torch hands their error over as the text of its traceback
    (``ProcessRaisedException``), whose last line is the project's; the signal is the one this
    process received (they were passed a forwarded one), else theirs."""
    if isinstance(err, ProcessExitedException) and signum is not None:  # a second signal
        return TrainingInterrupted(at_once(signal.Signals(signum).name), signum)
    if not isinstance(err, ProcessRaisedException):
        return None
    found = STOP_LINE.findall(err.msg)
    if not found:
        return None
    kind, theirs, rest = found[-1]
    signum = signum or signal.Signals[theirs]
    message = f"stopped by {signal.Signals(signum).name}{rest}"
    if kind == "TrainingInterrupted":
        return TrainingInterrupted(message, signum)
    return Stopped(message, signum)


def end_process_at_once(message: str, signum: int, stop_others: Any) -> NoReturn:
    """End this process of several now, as a second signal asks. Not by an exception: raised
    from a signal handler in the middle of a collective, Lightning swallows it
    (``_broadcast_sigterm_tensor`` catches every Exception) and the processes fall out of
    step and wait for each other forever."""
    stop_others()
    if speaks_for_the_command():
        say_error(message)
    sys.stdout.flush()
    os._exit(128 + signum)


def at_once(name: str) -> str:
    return f"stopped by {name} at once, without a checkpoint of the last steps"


def in_process_group() -> bool:
    """Whether this process is one of several, joined by torch.distributed."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def ignore_late_signal(signum: int, frame: Any) -> None:
    """A forwarded signal that came after this process stopped listening."""


def leave_process_group(together: bool) -> None:
    """Leave the process group of several processes, after the others reached this point too
    (``together``). Left to the interpreter's exit (Lightning's atexit handler), the group's
    teardown could meet another process that had already gone, and abort this one ('terminate
    called without an active exception', exit -6) after its work was done and said."""
    if not in_process_group():
        return
    if together:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def say_received(name: str) -> None:
    print(
        f"\n{name} received: finishing the current step, then saving a checkpoint "
        "(send it again to stop at once).",
        file=sys.stderr,
        flush=True,
    )
