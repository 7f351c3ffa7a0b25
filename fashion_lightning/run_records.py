"""What a run folder says about its run, read from the files every run already writes: the
TensorBoard events (or a CSVLogger's ``metrics.csv``), ``config.yaml`` and the checkpoints. Nothing is imported from the run and
nothing is written; a folder that cannot be read is a record with a ``problem``, not an error.

No torch, no Lightning: a hundred runs read in about a second (see :func:`event_records`).
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fashion_lightning.errors import first_line
from fashion_lightning.run_logs import (
    CSV_METRICS,
    EVENTS_GLOB,
    EVENTS_PREFIX,
    read_csv_metrics,
    read_events,
)

CONFIG_FILE = re.compile(r"^config(-(\d+))?\.yaml$")
# a run folder named after its config: sgd_0, best_3 (version_N: runs made before names)
NAMED_RUN = re.compile(r"^(?P<config>.+)_\d+$")
# config keys that say where and how a run was watched, not what it computed
NOT_SETTINGS = (
    "ckpt_path",
    "trainer.default_root_dir",
    "trainer.logger",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "data.data_dir",
    "data.source_dir",
    "data.download",
    "data.num_workers",
    "model.steps_per_call",  # the same run, bit for bit, whatever it is
    "checkpoint.",
    "images.",
)
# train_eval/*: the training images evaluated at each validation, with the weights validated
TRAIN_EVAL = ("train_eval/acc", "train_eval/loss", "train_eval/acc_gap", "train_eval/loss_gap")
CURVES = ("val/acc", "val/loss", "train/cross_entropy", "train/loss", "test/acc", *TRAIN_EVAL)
# the epochs done, at each whole training epoch's end, at the optimizer steps done
EPOCHS_DONE = "train/epochs_done"
# runs from before train/epochs_done: train/acc at each epoch's end and, since the curves
# against epochs, the epochs done with it (epoch/acc_train, the same value)
EPOCH_ENDS = ("train/acc", "epoch/acc_train")


@dataclass
class RunRecord:
    """One run folder, as read. Accuracies are fractions; epochs count from 1."""

    name: str  # the folder, relative to the root the runs were found under
    folder: Path
    config: str = ""  # the config's name, when the folder is named after it
    settings: dict[str, str] = field(default_factory=dict)  # the run's config, flattened
    planned_epochs: int | None = None
    epochs_done: int = 0
    best_val_acc: float | None = None
    best_epoch: int | None = None
    test_acc: float | None = None
    train_acc: float | None = None  # the training images at the last validation (train_eval)
    gap: float | None = None  # train_acc minus val/acc at the last validation
    started: float = 0.0  # the time its first event was written (TensorBoard orders runs so)
    wall_seconds: float = 0.0
    state: str = "unreadable"  # finished, stopped, running, failed, evaluated, unreadable
    problem: str = ""  # why the folder could not be read (whole or in part)
    # tag -> [(epoch, value)]: val/* at each validation, train/cross_entropy at each epoch's
    # end, train/loss at each logged step
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def config_of_folder(name: str) -> str:
    """The config a run folder is named after (``sgd`` for ``sgd_3``), or "" (``version_3``)."""
    named = NAMED_RUN.match(name)
    return named["config"] if named and not name.startswith("version_") else ""


def run_name(config_files: list[str | os.PathLike]) -> str | None:
    """What a run of these config files is called: the names of the files (``sgd`` for
    ``configs/sgd.yaml``, ``best+local`` for two), or None without a config. A run folder's own
    ``config.yaml`` names the run as that folder's run was named (``sgd`` in ``sgd_3/``)."""
    names = []
    for file in config_files:
        path = Path(str(file))
        name = config_of_folder(path.parent.name) if CONFIG_FILE.match(path.name) else path.stem
        names.append(re.sub(r"[^A-Za-z0-9.-]+", "-", name or "").strip(".-"))
    return "+".join(n for n in names if n) or None


def find_run_folders(root: Path) -> list[Path]:
    """Every folder below ``root`` that holds a run's files (events, a config or checkpoints),
    not looking inside a run (a search's trials are runs two levels down).

    A run is listed once, by its own path rather than through a symbolic link to it; a link
    to a folder outside the root is followed, and a link back up (to the root itself) is not
    walked again."""
    found: dict[str, Path] = {}  # the run's real path -> the path it is listed by
    _walk(root, found, links=False, walked=set())
    _walk(root, found, links=True, walked=set())  # runs reached only through a link
    return list(found.values())


def _walk(folder: Path, found: dict[str, Path], links: bool, walked: set[str]) -> None:
    real = os.path.realpath(folder)
    if real in walked:  # a link to a folder walked already: the root, a parent
        return
    walked.add(real)
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return
    for child in children:
        if child.is_symlink() and not links:
            continue
        if not is_run_folder(child):
            _walk(child, found, links, walked)
        else:
            found.setdefault(os.path.realpath(child), child)


def is_run_folder(folder: Path) -> bool:
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(
        name.startswith(EVENTS_PREFIX) or name == "checkpoints" or CONFIG_FILE.match(name)
        for name in names
    )


def read_run(folder: Path, root: Path) -> RunRecord:
    """The record of the run in ``folder``; whatever cannot be read is named in ``problem``."""
    record = RunRecord(name=folder.relative_to(root).as_posix(), folder=folder)
    # a run folder of the root, or of a lightning_logs in it (--root a default_root_dir); a
    # search's trial_N and confirm_seed_S_N, further down, are no config's names
    if folder.parent == root or folder.parent.name == "lightning_logs":
        record.config = config_of_folder(folder.name)
    problems = []
    try:
        config = _newest_config(folder)
        record.settings = flat_settings(config)
        epochs = config.get("trainer", {}).get("max_epochs")
        record.planned_epochs = epochs if isinstance(epochs, int) else None
    except (OSError, ValueError, yaml.YAMLError, AttributeError) as err:
        problems.append(f"config: {first_line(err)}")
    events = 0
    try:
        tags = (*CURVES, *EPOCH_ENDS, EPOCHS_DONE)
        scalars, spans, live, events, record.started = read_events(folder, tags)
    except Exception as err:  # a damaged record (protobuf's DecodeError), an unreadable file
        scalars, spans, live = {}, [], False
        problems.append(f"events: {type(err).__name__}: {first_line(err)}")
    csv_read = False
    if not scalars and (folder / CSV_METRICS).is_file():  # a run of Lightning's CSVLogger
        try:
            configs = [p for p in folder.iterdir() if CONFIG_FILE.match(p.name)]
            scalars, spans = read_csv_metrics(folder, (*CURVES, "train/acc"), configs)
            csv_read = True
        except (OSError, ValueError, csv.Error) as err:
            problems.append(f"{CSV_METRICS}: {first_line(err)}")
    _summarize(record, scalars)
    record.wall_seconds = sum(spans)
    if not (events or csv_read) and not any(
        p.startswith(("events", CSV_METRICS)) for p in problems
    ):
        written = any(folder.glob(EVENTS_GLOB))
        problems.append("events: none readable" if written else "events: none written")
    readable = events > 0 or csv_read or not any(p.startswith("config") for p in problems)
    record.state = _state(record, folder, live, scalars, readable)
    if record.state == "evaluated":  # it trained no epochs: its values are of its checkpoint
        record.epochs_done, record.best_epoch = 0, None
    record.problem = "; ".join(problems)
    return record


def _newest_config(folder: Path) -> dict[str, Any]:
    """The config of the run's newest command (a resumed run keeps ``config-2.yaml``...)."""
    found = [(int(m[2] or 1), p) for p in folder.iterdir() if (m := CONFIG_FILE.match(p.name))]
    if not found:
        raise ValueError("no config.yaml")
    loaded = yaml.safe_load(max(found)[1].read_text())
    if not isinstance(loaded, dict):
        raise ValueError("config.yaml is not a mapping")
    return loaded


def flat_settings(config: dict[str, Any]) -> dict[str, str]:
    """A config as ``key: value`` text, keys shortened as a person says them
    (``optimizer``, ``optimizer.lr``, ``max_epochs``), without what does not change results."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if prefix and any(prefix == n or prefix.startswith(n) for n in NOT_SETTINGS):
            return
        if isinstance(value, dict) and "class_path" in value:
            flat[_short(prefix)] = str(value["class_path"]).rsplit(".", 1)[-1]
            for key, inner in (value.get("init_args") or {}).items():
                walk(f"{prefix}.{key}", inner)
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, list):
            names = [
                str(v.get("class_path", v)).rsplit(".", 1)[-1] if isinstance(v, dict) else str(v)
                for v in value
            ]
            flat[_short(prefix)] = " + ".join(names) or "none"
        else:
            flat[_short(prefix)] = "none" if value is None else str(value)

    walk("", config)
    return flat


def _short(key: str) -> str:
    for group in ("model.", "data.", "trainer."):
        if key.startswith(group):
            return key.removeprefix(group)
    return key


def _summarize(record: RunRecord, scalars: dict[str, dict[int, float]]) -> None:
    """Epochs, the best ``val/acc`` and its epoch, ``test/acc`` and the curves against epochs."""
    validations = sorted(scalars.get("val/acc", {}).items())
    ends = [(0, 0.0), *_epoch_ends(record, scalars, validations)]
    record.epochs_done = int(ends[-1][1])
    for tag in CURVES:
        record.curves[tag] = [
            (_epoch_at(step, ends), v) for step, v in sorted(scalars.get(tag, {}).items())
        ]
    if validations:
        best = max(range(len(validations)), key=lambda k: (validations[k][1], -k))
        record.best_val_acc = validations[best][1]
        # the epoch the best validation came in (counted from 1, as val/best_epoch)
        record.best_epoch = math.ceil(_epoch_at(validations[best][0], ends))
    if scalars.get("test/acc"):
        record.test_acc = sorted(scalars["test/acc"].items())[-1][1]
    if scalars.get("train_eval/acc") and scalars.get("train_eval/acc_gap"):
        record.train_acc = sorted(scalars["train_eval/acc"].items())[-1][1]
        record.gap = sorted(scalars["train_eval/acc_gap"].items())[-1][1]


def _epoch_ends(
    record: RunRecord, scalars: dict[str, dict[int, float]], validations: list[tuple[int, float]]
) -> list[tuple[int, float]]:
    """(optimizer steps, epochs done) at the end of each training epoch.

    A run writes them as train/epochs_done. Runs from before it wrote train/acc at each
    epoch's end and, since the curves against epochs, the epochs done with it
    (epoch/acc_train), the same value: each of those is paired with the next train/acc of its
    value (an epoch max_steps cut short has a train/acc alone). Older runs, and validate or
    test commands, have validations only: the k-th ends epoch k times
    ``check_val_every_n_epoch``."""
    if scalars.get(EPOCHS_DONE):
        return [(step, float(done)) for step, done in sorted(scalars[EPOCHS_DONE].items())]
    steps, epochs = (sorted(scalars.get(tag, {}).items()) for tag in EPOCH_ENDS)
    unpaired = iter(steps)  # each search goes on after the previous pair
    ends = []
    for epoch, value in epochs:
        match = next((step for step, v in unpaired if v == value), None)
        if match is None:
            break
        ends.append((match, float(epoch)))
    if epochs and len(ends) == len(epochs):
        return ends
    every = int(record.settings.get("check_val_every_n_epoch", "1") or 1)
    return [(step, float((k + 1) * every)) for k, (step, _) in enumerate(validations)]


def _epoch_at(step: int, ends: list[tuple[int, float]]) -> float:
    for (step0, epoch0), (step1, epoch1) in itertools.pairwise(ends):
        if step <= step1:
            return epoch0 + (epoch1 - epoch0) * (step - step0) / max(step1 - step0, 1)
    if len(ends) > 1:  # after the last validation: at the pace of the last epoch
        (step0, epoch0), (step1, epoch1) = ends[-2], ends[-1]
        return epoch1 + (epoch1 - epoch0) * (step - step1) / max(step1 - step0, 1)
    return 0.0


def _state(record: RunRecord, folder: Path, live: bool, scalars: dict, readable: bool) -> str:
    """finished, running, stopped (``--ckpt_path last`` continues it), evaluated (a validate,
    test or predict command), failed (ended before its last epoch with nothing to continue from: an error,
    a kill in its first epoch), or unreadable (neither its config nor its events)."""
    trained = any(tag.startswith("train/") for tag in scalars)
    evaluation = scalars or (folder / "predictions.csv").is_file()  # predict logs no values
    if evaluation and not trained and not any((folder / "checkpoints").glob("*.ckpt")):
        return "evaluated"  # a validate, test or predict command: its folder has no training
    planned = record.planned_epochs
    finished = record.test_acc is not None or (
        planned is not None and record.epochs_done >= planned
    )
    if finished:
        return "finished"
    if live:
        return "running"
    if any((folder / "checkpoints").glob("last*.ckpt")):
        return "stopped"
    return "failed" if readable else "unreadable"
