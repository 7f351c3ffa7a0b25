"""Writing files whole: every file the project writes (checkpoints, the unpacked data set,
``predictions.csv``) goes through :func:`atomic_write`, so a crash, a ``kill -9`` or a full disk
leaves either the previous file or the new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from fashion_lightning.errors import cause_of


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_args) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; when the block ends without an
    error, fsync it and rename it onto ``path`` (then fsync the folder, so that the rename is
    durable). An error in the block leaves ``path`` as it was and no temporary file.

    A failed write (a full disk) raises OSError naming ``path``: libraries report it in their
    own words (torch: "unexpected pos ...") with the OSError only in the exception's context.
    Temporary files that killed processes left next to ``path`` are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        # created anew, never through a link someone left at that name: the link goes, the
        # file it points to stays as it was
        partial.unlink(missing_ok=True)
        with open(partial, mode, opener=_new_file, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except Exception as err:
        cause = cause_of(err, OSError)
        if cause is None or cause.errno is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from err
    finally:
        partial.unlink(missing_ok=True)
    fsync_folder(path.parent)
    for orphan in path.parent.glob(f".{path.name}.*.part"):
        pid = orphan.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_running(int(pid)):  # another live process may be writing
            orphan.unlink(missing_ok=True)


def _new_file(path: str, flags: int) -> int:
    """``open``'s opener for a file that must not exist yet, and never a link's target."""
    return os.open(path, flags | os.O_EXCL | os.O_NOFOLLOW, 0o666)


def fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def process_running(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (it may be another than it was)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as Linux's /proc counts it (clock ticks since boot, as
    text): tells it from a later process with the same pid. None where there is no /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_started_at(pid: int) -> float | None:
    """When process ``pid`` started, in seconds since the epoch (Linux's /proc; else None)."""
    ticks = process_start(pid)
    try:
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return None if ticks is None else boot + int(ticks) / os.sysconf("SC_CLK_TCK")


def ensure_writable_dir(path: Path) -> None:
    """Prove that a file can be written in ``path`` (raises OSError), creating it for the
    proof and removing again what the proof created: a command refused later leaves nothing.

    A real write, not ``os.access``: root passes every permission check but still cannot
    write to a read-only file system or under a regular file.
    """
    path = Path(os.path.abspath(path))
    made = [folder for folder in (path, *path.parents) if not folder.exists()]
    path.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    finally:
        for folder in made:  # deepest first
            with suppress(OSError):  # (another process wrote there meanwhile)
                folder.rmdir()


def claim_file(folder: Path, stem: str, suffix: str) -> str:
    """Create ``stem + suffix`` in ``folder``, or ``stem-2 + suffix`` and so on if it exists;
    return the name. Creating with O_EXCL fails if another process got there first."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        name = f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}"
        try:
            with (folder / name).open("x"):
                return name
        except FileExistsError:
            n += 1
