"""Worker processes on one study, and the signals that stop the search.

A terminal sends Ctrl+C (SIGINT) to every process of its foreground process group. The
command is the only process of the search in that group: each worker runs in a session of
its own, and the command passes every SIGINT/SIGTERM it receives on to each worker exactly
once. A worker thus sees one signal for one Ctrl+C (its trial stops at a clean step with a
checkpoint) and a second only when the user asks twice (it stops at once).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fashion_lightning.errors import SearchStopped
from fashion_lightning.stops import FORWARDED

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """SIGINT and SIGTERM in the search's own code. (While a trial's ``fit`` trains, the fit
    takes them over: it stops at a clean step with a checkpoint, and gives them back.)

    By default a signal raises :class:`SearchStopped` at once. Inside Optuna's bookkeeping
    between trials (creating a trial, sampling, recording a result, failing a dead trial and
    queueing it again) an exception would leave a trial started but neither run nor queued
    again, and one raised in the middle of a write to the study could leave the journal's
    lock behind; there the signal is kept (:meth:`deferring`) and raised at the next
    :meth:`check`, at the latest when the next trial's fit starts."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first stop signal this process received
        self._raise_at_once = True

    def install(self) -> None:
        """Take SIGINT and SIGTERM (and the word that the command died, see
        :func:`stop_when_parent_dies`), and let through those that came while they were
        blocked (a worker starts with them blocked: see :func:`run_workers`)."""
        for signum in (*SIGNALS, FORWARDED):
            signal.signal(signum, self._received)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def _received(self, signum: int, frame) -> None:
        if signum == FORWARDED:  # the command died: stop as after its SIGTERM
            signum = signal.SIGTERM
        first = self.signum is None
        if first:
            self.signum = signum
        if first and self._raise_at_once:  # later ones: the stop is under way already
            raise SearchStopped(signum)

    def note(self, signum: int) -> None:
        """A stop that reached this process another way (the trial's fit took the signal)."""
        if self.signum is None:
            self.signum = signum

    def check(self) -> None:
        """Raise the stop that a signal asked for, if one did."""
        if self.signum is not None:
            raise SearchStopped(self.signum)

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """Keep a signal for the next :meth:`check` while the block runs."""
        before, self._raise_at_once = self._raise_at_once, False
        try:
            yield
        finally:
            self._raise_at_once = before

    @contextmanager
    def raising(self) -> Iterator[None]:
        """Raise at once again within a :meth:`deferring` block (a trial, a wait)."""
        before, self._raise_at_once = self._raise_at_once, True
        try:
            self.check()
            yield
        finally:
            self._raise_at_once = before

    def sleep(self, seconds: float) -> None:
        """Wait, stoppable at once."""
        with self.raising():
            time.sleep(seconds)


# signals are the process's: one handler for the whole search (trials, the search file's
# checks, waiting), that each part asks whether a stop came
STOPS = StopSignals()


def stop_when_parent_dies(parent_pid: int) -> None:
    """A worker is told when the command that started it dies, even by ``kill -9``: its
    trial stops with its checkpoint and is tried again later, rather than the search going on
    unseen. Linux's ``prctl(PR_SET_PDEATHSIG)``, which Python's library does not offer.

    The kernel may say it more than once (seen twice, from the dead command's pid): not with
    SIGTERM, whose second one stops a trial at once without its checkpoint, but with the
    signal the command passes on to the processes it started (``stops.FORWARDED``), which a
    trial takes once and a stop under way ignores."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, FORWARDED)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker finishes its trials
        return
    if parent_pid and os.getppid() != parent_pid:  # the parent died before the call
        os.kill(os.getpid(), FORWARDED)


def run_workers(argv: list[str], workers: int) -> int:
    """Run ``workers`` processes on the study and wait for them; pass each signal on to each
    worker once. Returns the first failed worker's exit code (0: none failed); raises
    :class:`SearchStopped` when a signal stopped them."""
    command = [
        *(sys.executable, "-m", "fashion_lightning.tune", *argv),
        *("--worker_of", str(workers), "--parent_pid", str(os.getpid())),
    ]
    processes: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in SIGNALS}
    try:
        # each worker starts with the signals blocked and takes them once its handler is in
        # place: a signal forwarded meanwhile waits for it, rather than ending it half-started
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            for _ in range(workers):
                # a session of its own: a terminal's Ctrl+C reaches the command alone
                processes.append(subprocess.Popen(command, start_new_session=True))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        codes = [process.wait() for process in processes]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        STOPS.note(received[0])
        raise SearchStopped(
            received[0],
            f"stopped by {signal.Signals(received[0]).name}: the workers' running trials are "
            "queued again; the same command continues the study",
        )
    for process in processes:
        if process.returncode < 0:  # killed (kill -9, out of memory): others go on
            name = signal.Signals(-process.returncode).name
            print(f"worker {process.pid} was killed by {name}", file=sys.stderr)
    failed = [code for code in codes if code > 0]
    return failed[0] if failed else 0
