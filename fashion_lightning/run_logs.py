"""Reading the logs a run writes, as they are on disk: TensorBoard's events files (without
TensorFlow, fast) and a CSVLogger's ``metrics.csv``."""

from __future__ import annotations

import csv
import socket
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.util import tensor_util

from fashion_lightning.files import process_running, process_started_at

EVENTS_PREFIX = "events.out.tfevents."
EVENTS_GLOB = f"{EVENTS_PREFIX}*"
CSV_METRICS = "metrics.csv"  # what Lightning's CSVLogger writes


def read_events(
    folder: Path, tags: Collection[str]
) -> tuple[dict[str, dict[int, float]], list[float], bool, int, float]:
    """The scalars of ``tags`` in every events file in order (tag -> step -> value, what a resumed run
    purged dropped, as TensorBoard does), the seconds each process wrote for, whether a
    process that writes them still runs on this machine, how many events were read, and the
    time of the first."""
    scalars: dict[str, dict[int, float]] = {}
    times: dict[str, list[float]] = {}
    live = False
    read = 0
    for path in sorted(events_files(folder), key=_events_order):
        created, host, pid, _ = writer_of(path)
        writer = f"{host}:{pid}"
        if not live and host == socket.gethostname() and pid > 0:
            started = process_started_at(pid)
            live = process_running(pid) and (started is None or started <= created + 1)
        for event in event_records(path):
            read += 1
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                for values in scalars.values():  # a resume: what followed its checkpoint goes
                    for step in [s for s in values if s >= event.step]:
                        del values[step]
            for value in event.summary.value:
                if value.tag in tags:
                    scalars.setdefault(value.tag, {})[event.step] = _number(value)
            if event.wall_time:
                times.setdefault(writer, []).append(event.wall_time)
    spans = [max(t) - min(t) for t in times.values()]
    return scalars, spans, live, read, min((min(t) for t in times.values()), default=0.0)


def read_csv_metrics(
    folder: Path, tags: Collection[str], configs: list[Path]
) -> tuple[dict[str, dict[int, float]], list[float]]:
    """The scalars of ``tags`` in a CSVLogger run's ``metrics.csv`` as :func:`read_events` gives
    them (tag -> step -> value), with the epochs done at each epoch's end (``epoch/acc_train``,
    as the project's TensorBoard logger writes them), and the seconds from the first of the
    run's ``configs`` files to the last write of the file (a CSV log keeps no times)."""
    path = folder / CSV_METRICS
    scalars: dict[str, dict[int, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for tag in tags:
                if row.get(tag):
                    scalars.setdefault(tag, {})[step] = float(row[tag])
            if row.get("train/acc") and row.get("epoch"):
                done = int(float(row["epoch"])) + 1
                scalars.setdefault("epoch/acc_train", {})[done] = float(row["train/acc"])
    start = min((config.stat().st_mtime for config in configs), default=path.stat().st_mtime)
    return scalars, [path.stat().st_mtime - start]


def last_steps(folder: Path, prefix: str) -> dict[str, int]:
    """The last step of each scalar whose tag starts with ``prefix`` in a run folder's events
    files: for ``epoch/``, the epochs a stopped run has drawn."""
    last: dict[str, int] = {}
    for path in events_files(folder):
        try:
            for event in event_records(path):
                for value in event.summary.value:
                    if value.tag.startswith(prefix):
                        last[value.tag] = max(last.get(value.tag, 0), event.step)
        except Exception:  # a damaged record (protobuf's DecodeError): what was read counts
            continue
    return last


def events_files(folder: Path) -> list[Path]:
    """The events files of a run folder: regular files only (reading a pipe would wait)."""
    return [path for path in folder.glob(EVENTS_GLOB) if path.is_file()]


def event_records(path: Path) -> Iterator[Event]:
    """The events of a TensorBoard file, up to a record cut short (a writer that died).

    Written here because TensorBoard's reader checks each record's CRC-32C in pure Python
    (without TensorFlow): 0.15 s a run, most of it on the pictures' bytes. The record
    format is ``length (8 bytes), its masked CRC (4), data, the data's masked CRC (4)``; the
    length's CRC is checked (a foreign file stops here), the data's is not (the protobuf
    parser refuses damaged data).
    """
    with path.open("rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12 or masked_crc32c(header[:8]) != int.from_bytes(
                header[8:], "little"
            ):
                return
            data = f.read(int.from_bytes(header[:8], "little"))
            if len(f.read(4)) < 4:
                return
            yield Event.FromString(data)


def _number(value: Any) -> float:
    """A scalar as SummaryWriter writes it (``simple_value``), or as a 0-d tensor."""
    if value.HasField("simple_value"):
        return value.simple_value
    return float(tensor_util.make_ndarray(value.tensor).reshape(()))


def writer_of(path: Path) -> tuple[int, str, int, int]:
    """What SummaryWriter puts in an events file's name,
    ``events.out.tfevents.<created>.<host>.<pid>.<n>``: created, host, pid and n (0 where a
    foreign name has no number)."""
    parts = path.name.split(".")
    number = [int(p) if p.isdigit() else 0 for p in parts]
    host = ".".join(parts[4:-2])
    return (number[3] if len(parts) > 3 else 0, host, number[-2], number[-1])


def _events_order(path: Path) -> tuple[int, int]:
    created, _, _, n = writer_of(path)
    return created, n
