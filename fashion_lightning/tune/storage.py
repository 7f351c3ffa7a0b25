"""Where a study lives (a journal file, or an Optuna RDB URL) and how a dead worker's trial
is told from a running one."""

from __future__ import annotations

import os
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from fashion_lightning.errors import UserError, first_line

MAX_RETRIES = 2  # how often the parameters of a trial that was stopped or died are tried again


def open_storage(spec: str | None, default: Path) -> optuna.storages.BaseStorage:
    """A journal file (the default: several processes on one machine share it safely) or an
    Optuna RDB URL (sqlite:///..., postgresql://...), whose workers send heartbeats so that
    a dead machine's trial is failed and its parameters tried again."""
    if spec is None or "://" not in spec:
        path = Path(spec) if spec else default
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise UserError(
                f"--storage {path}: cannot write the study's journal file there "
                f"({err.strerror or err}); name a file in a writable folder"
            ) from None
        except ValueError as err:  # json's error: not a journal, or a damaged one
            raise UserError(
                f"--storage {path}: not a readable Optuna journal ({err}); name another file"
            ) from None
    if spec.startswith("sqlite:///") and spec != "sqlite:///:memory:":
        folder = Path(spec.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(
                f"--storage {shown(spec)}: cannot create {folder} ({err.strerror or err})"
            ) from None
    for attempt in range(5):
        try:
            return RDBStorage(
                spec,
                heartbeat_interval=60,
                grace_period=180,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRIES
                ),
            )
        except Exception as err:  # SQLAlchemy's errors: a bad URL, a missing driver, no server
            first = first_line(err)
            # machines that start together race to create the tables: the loser tries again
            racing = "already exists" in first or "duplicate key" in first
            if not racing or attempt == 4:
                raise UserError(
                    f"--storage {shown(spec)}: cannot open the study storage ({first})"
                ) from None
            time.sleep(0.5 + attempt)


def shown(storage: str) -> str:
    """A storage URL as it may be printed: without its password."""
    if "://" not in storage:
        return storage
    from sqlalchemy.engine import make_url  # Optuna's RDB storage is SQLAlchemy

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: opening it says so
        return storage


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux), to tell it from a later process with the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or process_start(pid) in (None, started)
