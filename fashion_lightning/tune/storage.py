"""Where a study lives (a journal file, or an Optuna RDB URL), how a dead worker's trial is
told from a running one, and how a storage URL is printed (never with its password)."""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial

from fashion_lightning.errors import SearchError, UserError, first_line
from fashion_lightning.files import claim_file, process_running, process_start
from fashion_lightning.tune.workers import STOPS

MAX_RETRIES = 2  # how often the parameters of a trial that was stopped or died are tried again
HEARTBEAT_SECONDS = 60  # an RDB trial's heartbeat interval, unless --heartbeat says otherwise
GRACE_HEARTBEATS = 3  # missed heartbeats before a trial counts as dead, unless --grace says
HIDDEN = "***"


def is_url(spec: str | None) -> bool:
    """Whether ``--storage`` names an Optuna RDB URL rather than a journal file."""
    return spec is not None and "://" in spec


def open_storage(
    spec: str | None, default: Path, heartbeat: int, grace: int
) -> optuna.storages.BaseStorage:
    """A journal file (the default: several processes on one machine share it safely) or an
    Optuna RDB URL (sqlite:///..., postgresql://...), whose trials send a heartbeat every
    ``heartbeat`` seconds, so that a trial silent for ``grace`` seconds (a dead machine) is
    failed and its parameters tried again."""
    if not is_url(spec):
        return _open_journal(Path(spec) if spec else default, given=spec is not None)
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
                heartbeat_interval=heartbeat,
                grace_period=grace,
                heartbeat_stale_trial_callback=RetryStaleTrial(grace),
            )
        except Exception as err:  # SQLAlchemy's errors: a bad URL, a missing driver, no server
            STOPS.check()  # a signal, not the storage
            first = first_line(err)
            # machines that start together race to create the tables: the loser tries again
            racing = "already exists" in first or "duplicate key" in first
            if not racing or attempt == 4:
                raise UserError(
                    f"--storage {shown(spec)}: cannot open the study storage "
                    f"({scrubbed(first, spec)})"
                ) from None
            time.sleep(0.5 + attempt)


class RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose heartbeats stopped (its machine or process died), up
    to :data:`MAX_RETRIES` times, said in one line."""

    def __init__(self, grace: int) -> None:
        super().__init__(max_retry=MAX_RETRIES)
        self.grace = grace

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        print(
            f"trial {trial.number}: no heartbeat for over {self.grace} s (its machine or "
            "process died): failed; its parameters will be tried again",
            file=sys.stderr,
        )
        super().__call__(study, trial)


def _open_journal(path: Path, given: bool) -> JournalStorage:
    option = "--storage" if given else "--trainer.default_root_dir"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # one kind of lock for every writer (both of Optuna's kinds take the same .lock file)
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        set_aside_torn_line(path)
        return JournalStorage(backend)
    except OSError as err:
        raise UserError(
            f"cannot write the study's journal file {path} ({err.strerror or err}); "
            f"pass a writable {option}"
        ) from None
    except ValueError as err:  # json's error: not a journal, or a damaged one
        raise UserError(
            f"--storage {path}: not a readable Optuna journal ({err}); name another file"
        ) from None


def set_aside_torn_line(journal: Path) -> None:
    """A journal whose last line was cut (a power loss, a full disk) keeps the study: the
    fragment moves to a side file next to it and the journal ends at its last whole line.
    (Optuna reads past such a fragment, and its next write would append to it, making a line
    that no reader gets past.) Done under Optuna's lock of the journal, so no writer is
    half-way through a line meanwhile. A file that is no journal is left as it is."""
    lock = JournalFileOpenLock(str(journal))
    # a signal meanwhile waits: raised between taking the lock and the try, it would leave
    # the lock behind (and every process of the study waiting 30 s for it)
    with STOPS.deferring():
        lock.acquire()
        try:
            torn = _torn_tail(journal.read_bytes())
            if torn is not None:
                side = _set_aside(journal, torn)
        finally:
            lock.release()
    if torn is not None:
        print(
            f"note: {journal} ended in a torn line ({len(torn)} bytes, from a crash or a full "
            f"disk during a write): moved to {side}; the study continues from its last whole "
            "line",
            file=sys.stderr,
        )
    STOPS.check()


def _set_aside(journal: Path, torn: bytes) -> Path:
    """Move the journal's torn end into a new side file; return that file."""
    side = journal.with_name(claim_file(journal.parent, f"{journal.name}.torn-{_utc_stamp()}", ""))
    with side.open("wb") as f:
        f.write(torn)
        f.flush()
        os.fsync(f.fileno())
    with journal.open("r+b") as f:
        f.truncate(journal.stat().st_size - len(torn))
        os.fsync(f.fileno())
    return side


def _torn_tail(content: bytes) -> bytes | None:
    """The journal's last line if it is torn (no newline, or not one of Optuna's operations)
    and everything before it is a journal; otherwise None."""
    if not content:
        return None
    start = content.rfind(b"\n", 0, len(content) - 1) + 1
    last = content[start:]
    if last.endswith(b"\n") and _is_operation(last):
        return None
    whole = content[:start].splitlines()
    if whole:
        is_journal = all(_is_operation(line) for line in whole)
    else:  # the study's first line was torn
        is_journal = last.startswith(b'{"op_code"')
    return last if is_journal else None


def _is_operation(line: bytes) -> bool:
    try:
        operation = json.loads(line)
    except ValueError:
        return False
    return isinstance(operation, dict) and "op_code" in operation


def _utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


# --- passwords ---------------------------------------------------------------------------

# a query parameter that may hold a secret (password=, sslpassword=, passwd=, token=...)
SECRET_PARAMETER = re.compile(r"(?i)[\w.-]*(?:pass|pwd|secret|token)[\w.-]*=")


def shown(storage: str) -> str:
    """A storage spec as it may be printed: no byte of a password, whatever the text looks
    like. Written by hand, not with SQLAlchemy's ``render_as_string``, which shows the part
    of a password after an '@', keeps ``?password=`` and cannot render a URL it does not
    parse: here the password is taken wide (from the ':' after the user name to the URL's
    last '@'), and a secret in the query hides the rest of the text."""
    text = _without_secret_parameters(storage)
    span = _password_span(text)
    if span is None:
        return text
    return text[: span[0]] + HIDDEN + text[span[1] :]


def _without_secret_parameters(text: str) -> str:
    found = SECRET_PARAMETER.search(text)
    return text if found is None else text[: found.end()] + HIDDEN


# a host of a URL, as far as it matters here: a name or [IPv6] address, and a port number
HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[\w.%-]+)(?::\d+)?")


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the password of ``scheme://user:password@host...`` is, taken wide; None if
    there is none. When what follows the last '@' is no host (``user:pa@:/ss``), the rest
    of the text is taken too. Without an '@', ``scheme://name:text`` is read as a password
    unless the text is a port number."""
    if "://" not in url:
        return None
    start = url.index("://") + 3
    at = url.rfind("@", start)
    if at == -1:
        authority = re.split(r"[/?#]", url[start:], maxsplit=1)[0]
        name, colon, port = authority.partition(":")
        if not colon or port.isdigit() or name.startswith("["):
            return None
        begin = start + len(name) + 1
        return begin, begin + len(port)
    colon = url.find(":", start, at)
    if colon == -1:
        return None
    hosts = re.split(r"[/?#]", url[at + 1 :], maxsplit=1)[0]
    if hosts and not all(HOST.fullmatch(host) for host in hosts.split(",")):
        return colon + 1, len(url)
    return colon + 1, at


def check_url(spec: str) -> None:
    """Refuse a URL whose password SQLAlchemy would read otherwise than it is written (an
    unencoded '@' in it): the rest of the password would reach its host name, and the
    driver's error messages."""
    span = _password_span(_without_secret_parameters(spec))
    if span is None:
        return
    from sqlalchemy.engine import make_url  # Optuna's RDB storage is SQLAlchemy

    try:
        read = make_url(spec).password
    except Exception:  # SQLAlchemy raises ValueError, ArgumentError...
        read = None
    if read != unquote(spec[span[0] : span[1]]):
        raise SearchError(
            f"--storage {shown(spec)}: SQLAlchemy would not read this as "
            "scheme://user:password@host:port/database; write the password's '@', ':', '/', "
            "'?' and '#' percent-encoded (@ is %40, : is %3A, / is %2F)"
        )


def scrubbed(message: str, spec: str) -> str:
    """A library's message about ``spec`` without its secrets in any form."""
    for secret in _secrets(spec):
        message = message.replace(secret, HIDDEN)
    return shown(message)


def _secrets(spec: str) -> set[str]:
    """The password of ``spec`` and the values of its secret parameters, as written and
    decoded."""
    found = set()
    span = _password_span(_without_secret_parameters(spec))
    if span is not None:
        found.add(spec[span[0] : span[1]])
    for parameter in SECRET_PARAMETER.finditer(spec):
        rest = spec[parameter.end() :]
        found |= {rest, rest.split("&")[0]}
    return {form for secret in found for form in (secret, unquote(secret)) if form}


# --- dead workers --------------------------------------------------------------------------


def alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` of this machine, started at ``started``, still runs."""
    if not process_running(pid):
        return False
    return started is None or process_start(pid) in (None, started)
