"""Worker processes on one study, and the signals that stop them."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

from fashion_lightning.errors import SearchStopped


def stop_on_signals() -> None:
    """SIGINT/SIGTERM between trials stop the search at once (during a trial's training the
    trial's own handler saves its checkpoint first)."""

    def stop(signum, frame):
        raise SearchStopped(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


def stop_when_parent_dies() -> None:
    """A worker gets SIGTERM when the command that started it dies, even by ``kill -9``: its
    trial stops with its checkpoint and is tried again later, rather than the search going on
    unseen. Linux's ``prctl(PR_SET_PDEATHSIG)``, which Python's library does not offer."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker finishes its trials
        return
    if os.getppid() == 1:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def run_workers(argv: list[str], workers: int) -> int:
    """Start ``workers`` processes on the study; pass signals on; the first failure's code."""
    command = [sys.executable, "-m", "fashion_lightning.tune", *argv, "--worker_of", str(workers)]
    processes = [subprocess.Popen(command) for _ in range(workers)]

    def forward(signum, frame):
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    codes = [process.wait() for process in processes]
    for process in processes:
        if process.returncode < 0:  # killed (kill -9, out of memory): others go on
            name = signal.Signals(-process.returncode).name
            print(f"worker {process.pid} was killed by {name}", file=sys.stderr)
    failed = [code for code in codes if code > 0]
    return failed[0] if failed else 0
