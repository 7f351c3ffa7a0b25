"""``--ckpt_path last``, ``best`` or a file: found, read once, checked, compared with the config.

A checkpoint is data. It is read with ``torch.load(weights_only=True)`` (no pickled code), and
the hyperparameters that LightningCLI would merge into the config may name only the classes
that the model's arguments accept (:mod:`fashion_lightning.configs`), found among the modules
already loaded: a crafted file is refused in one line before anything is built or run.

Where runs keep their checkpoints follows Lightning: ``<save_dir>/<name>/version_N/checkpoints/``
with the TensorBoard logger (``lightning_logs/version_N/checkpoints/`` by default),
``<default_root_dir>/checkpoints/`` without a logger, or ``--checkpoint.dirpath``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from argparse import ArgumentError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fashion_lightning.checkpoint_contents import (
    LIGHTNING_INSTANTIATOR,
    Refused,
    check_contents,
    check_restorable,
    forget_foreign_files,
    upgrade,
    url_problem,
)
from fashion_lightning.configs import ACCEPTED_CLASSES, class_problem, flat
from fashion_lightning.errors import CheckpointError
from fashion_lightning.run_records import config_of_folder, run_name

# how a refused checkpoint ends its one line
REFUSING = "refusing a crafted or foreign checkpoint (nothing was run)"
CROSS_ENTROPY_KEY = "train_cross_entropy"  # the epoch's training cross-entropy so far

LAST_CHECKPOINT = "last.ckpt"
# the data values that decide which images a run trains on, in which order: fixed on resume
TRAINING_ORDER = ("batch_size", "seed", "val_size")
# model arguments that change how fast a run goes, not what it computes: a resume may change them
SPEED_ONLY = ("steps_per_call",)
# ModelCheckpoint's names for the last checkpoint: last.ckpt, or last-v1.ckpt, last-v2.ckpt...
# when a folder already holds another run's (several runs without a logger share a folder)
LAST_CHECKPOINT_PATTERNS = ("last.ckpt", "last-v*.ckpt")


@dataclass
class Checkpoint:
    """A checkpoint file and what it holds, read once."""

    path: Path
    contents: dict[str, Any]

    @property
    def hyper_parameters(self) -> dict[str, Any]:
        """The model's arguments, without Lightning's bookkeeping key."""
        found = dict(self.contents.get("hyper_parameters") or {})
        found.pop("_instantiator", None)
        return found

    @property
    def data_hyper_parameters(self) -> dict[str, Any]:
        return dict(self.contents.get("datamodule_hyper_parameters") or {})

    @property
    def global_step(self) -> int:
        return int(self.contents.get("global_step", 0))

    def recorded_best(self) -> Path | None:
        """The best checkpoint of this run as its checkpoint callback recorded it: the file, or
        the file of that name next to this one if the run was moved."""
        for key, state in (self.contents.get("callbacks") or {}).items():
            if (
                "Checkpoint" in str(key)
                and isinstance(state, dict)
                and state.get("best_model_path")
            ):
                recorded = Path(state["best_model_path"])
                for candidate in (recorded, self.path.parent / recorded.name):
                    if candidate.is_file():
                        return candidate
        return None


def read_checkpoint(path: Path, option: str = "--ckpt_path") -> Checkpoint:
    """Load the checkpoint at ``path``, checked to hold only what this project writes;
    CheckpointError (one line naming ``option``) if it is missing, damaged or crafted."""
    where = f"{option} {path}"
    try:
        exists, size = path.is_file(), path.stat().st_size if path.is_file() else 0
    except OSError as err:  # a name too long, a folder that cannot be read
        raise CheckpointError(f"{where}: cannot read it ({err.strerror or err})") from None
    if not exists:
        raise CheckpointError(
            f"{where}: no such file. Runs keep theirs in lightning_logs/version_N/"
            "checkpoints/; --ckpt_path last takes the newest"
        )
    if size == 0:
        raise CheckpointError(f"{where}: the file is empty; pick another checkpoint")
    try:
        with warnings.catch_warnings():  # a sparse tensor is refused below, in one line
            warnings.filterwarnings("ignore", "Validating sparse tensor invariants")
            contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's unpickler: truncated, not a PyTorch file, a code object
        raise CheckpointError(
            f"{where}: not a readable checkpoint, truncated or not a PyTorch file "
            f"({type(err).__name__}); pick another checkpoint"
        ) from None
    if not isinstance(contents, dict) or not isinstance(contents.get("state_dict"), dict):
        raise CheckpointError(f"{where}: not a Lightning checkpoint (no state_dict)")
    checkpoint = Checkpoint(path, contents)
    _check_named_classes(checkpoint, where)
    _check_cross_entropy_sums(checkpoint, where)
    try:
        upgrade(contents)
        check_contents(contents)
    except Refused as refused:
        raise CheckpointError(f"{where}: {refused}; {REFUSING}") from None
    forget_foreign_files(contents, path)
    return checkpoint


def _check_cross_entropy_sums(checkpoint: Checkpoint, where: str) -> None:
    """The epoch's training cross-entropy so far, as the model keeps it: two numbers, or
    nothing in a checkpoint written before it was kept."""
    sums = checkpoint.contents.get(CROSS_ENTROPY_KEY)
    numbers = (
        isinstance(sums, dict)
        and sorted(sums) == ["images", "sum"]
        and type(sums["images"]) is int
        and type(sums["sum"]) in (int, float)
        and 0 <= sums["sum"] < math.inf  # a sum of cross-entropies, each one finite
        and sums["images"] >= 0
    )
    if sums is not None and not numbers:
        raise CheckpointError(
            f"{where}: {CROSS_ENTROPY_KEY} is not the two numbers this project writes; {REFUSING}"
        )


def _check_named_classes(checkpoint: Checkpoint, where: str) -> None:
    """Refuse hyperparameters that would make LightningCLI import or call anything but an
    accepted optimizer or scheduler class: checked before any of it is parsed."""
    raw = checkpoint.contents.get("hyper_parameters") or {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: hyper_parameters is not a mapping; not this project's")
    instantiator = raw.get("_instantiator")
    if instantiator not in (None, LIGHTNING_INSTANTIATOR):
        raise CheckpointError(
            f"{where}: hyper_parameters._instantiator names {instantiator!r}, which this project "
            "never writes; refusing a crafted checkpoint (nothing was run)"
        )
    if "_class_path" in raw:  # LightningCLI would build the model from the class it names
        raise CheckpointError(
            f"{where}: hyper_parameters._class_path names {raw['_class_path']!r} to build the "
            "model with, which this project never writes; refusing a crafted checkpoint "
            "(nothing was run)"
        )
    for key, value in checkpoint.hyper_parameters.items():
        problem = None
        if key in ACCEPTED_CLASSES:
            problem = class_problem(key, value)
        elif not _plain(value):
            problem = "it is not a plain value, and this argument takes one"
        if problem:
            raise CheckpointError(f"{where}: hyper_parameters.{key}: {problem}; {REFUSING}")


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def check_fits(checkpoint: Checkpoint, model: torch.nn.Module) -> None:
    """CheckpointError unless the checkpoint's weights (and the raw ones that a weight average
    keeps beside them) have the names and shapes of ``model``'s."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for key in ("state_dict", "current_model_state"):
        if key not in checkpoint.contents:
            continue
        found = {
            name: tuple(getattr(t, "shape", ())) for name, t in checkpoint.contents[key].items()
        }
        if found != expected:
            differing = sorted(set(expected.items()) ^ set(found.items()))[:3]
            raise CheckpointError(
                f"--ckpt_path {checkpoint.path}: a checkpoint of another model (differs in "
                f"{', '.join(f'{name} {shape}' for name, shape in differing)}); "
                "pass a checkpoint that this project's fit wrote"
            )


def check_restores_into(checkpoint: Checkpoint, trainer: Any, model: Any, fitting: bool) -> None:
    """CheckpointError unless what Lightning restores into ``trainer`` is like what it writes
    (:func:`~fashion_lightning.checkpoint_contents.check_restorable`)."""
    if fitting and "optimizer_states" not in checkpoint.contents:  # (Lightning: a KeyError)
        raise CheckpointError(
            f"--ckpt_path {checkpoint.path}: it holds the weights only (written with "
            "checkpoint.save_weights_only), which validate, test and predict take; fit cannot "
            "continue from it (nothing was run)"
        )
    try:
        check_restorable(checkpoint.contents, trainer, model, fitting)
    except Refused as refused:
        raise CheckpointError(f"--ckpt_path {checkpoint.path}: {refused}; {REFUSING}") from None


def differences(group: str, recorded: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """``"model.hidden_size 512 (asked: 256)"`` for each value of ``asked`` that differs from
    the checkpoint's ``recorded`` one; a class (optimizer, scheduler) counts as one value when
    it is set on one side only."""
    shown = []
    for key in recorded.keys() | asked.keys():
        mine, theirs = recorded.get(key), asked.get(key)
        if mine == theirs:
            continue
        if isinstance(mine, dict) and isinstance(theirs, dict):
            ours, others = flat(mine, prefix=key), flat(theirs, prefix=key)
            leaves = sorted(k for k in ours.keys() | others.keys() if ours.get(k) != others.get(k))
            shown += [
                f"{group}.{k} {_shown(ours.get(k))} (asked: {_shown(others.get(k))})"
                for k in leaves
            ]
        else:
            shown.append(f"{group}.{key} {_shown(mine)} (asked: {_shown(theirs)})")
    return sorted(shown)


def _shown(value: Any) -> str:
    if isinstance(value, dict) and "class_path" in value:
        return value["class_path"]
    return "none" if value is None else str(value)


def checkpoint_folders(
    default_root_dir: str | None, logger: Any, checkpoint_dirpath: str | None
) -> tuple[list[Path], str]:
    """The folders where the runs of this config keep their checkpoints, from the parsed config,
    and a phrase that says where that is (for messages).

    ``logger`` is the config's ``trainer.logger``: ``None``/``True`` (the default logger),
    ``False``, or a logger's ``class_path``/``init_args`` (or a list of them; the first counts).
    """
    if checkpoint_dirpath:
        return [Path(checkpoint_dirpath)], str(checkpoint_dirpath)
    root = Path(default_root_dir or os.getcwd())
    if isinstance(logger, list):
        logger = logger[0] if logger else False
    if logger is False:
        return [root / "checkpoints"], str(root / "checkpoints")
    if logger is None or logger is True:
        runs = root / "lightning_logs"
    else:
        init_args = getattr(logger, "init_args", None) or {}
        save_dir = getattr(init_args, "save_dir", None)
        if save_dir is None:
            raise CheckpointError(
                f"cannot tell where a {getattr(logger, 'class_path', logger)} run keeps its "
                "checkpoints; pass the checkpoint file to --ckpt_path"
            )
        runs = Path(save_dir) / getattr(init_args, "name", "lightning_logs")
    return sorted(runs.glob("*/checkpoints")), str(runs)


def newest_last_checkpoint(folders: list[Path]) -> Path | None:
    """The most recently written last checkpoint in ``folders``, or None."""
    found = [
        path for folder in folders for p in LAST_CHECKPOINT_PATTERNS for path in folder.glob(p)
    ]
    found = [path for path in found if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime_ns, default=None)


def find_checkpoint(ckpt_path: str, folders: list[Path], where: str) -> Checkpoint:
    """The checkpoint ``--ckpt_path`` means, read: the file itself, or the newest run's last
    (``last``) or its recorded best (``best``)."""
    if ckpt_path not in ("last", "best"):
        problem = url_problem(ckpt_path)
        if problem:
            raise CheckpointError(
                f"--ckpt_path {ckpt_path}: {problem}; checkpoints are read from local files only "
                f"(docs/trust.md): download it first (a local file named so: ./{ckpt_path})"
            )
        return read_checkpoint(Path(ckpt_path))
    last = newest_last_checkpoint(folders)
    if last is None and ckpt_path == "last":
        raise CheckpointError(
            f"--ckpt_path last: no last.ckpt under {where} to resume; "
            "drop --ckpt_path to start a new run"
        )
    if last is None:
        raise CheckpointError(
            f"--ckpt_path best: no last.ckpt under {where} to find the best checkpoint "
            "from; pass a checkpoint file to --ckpt_path"
        )
    newest = read_checkpoint(last, option=f"--ckpt_path {ckpt_path}: the newest run's")
    if ckpt_path == "last":
        return newest
    best = newest.recorded_best()
    if best is None:
        raise CheckpointError(
            f"--ckpt_path best: the newest run ({last.parent}) records no best checkpoint "
            "that still exists; pass a checkpoint file to --ckpt_path"
        )
    return read_checkpoint(best, option="--ckpt_path best:")


def take_checkpoint(parser: Any, config: Any, subcommand: str) -> tuple[Any, Checkpoint]:
    """Find, read and check the checkpoint ``--ckpt_path`` names in ``config`` (the parsed
    config of all subcommands), then take the model's arguments from it, as LightningCLI
    would, once the file proved to be data; return the new config and the checkpoint.

    A resumed ``fit`` refuses values that differ from the checkpoint's (the model, and the
    data values that decide the training order); evaluation says which ones it replaced.
    Arguments that change only the speed (``SPEED_ONLY``) keep the asked value.
    """
    section = config[subcommand]
    folders, where = [], ""
    if section.ckpt_path in ("last", "best"):
        trainer = section.trainer
        folders, where = checkpoint_folders(
            trainer.default_root_dir, trainer.logger, section.checkpoint.dirpath
        )
        # runs named after this config (sgd_N for configs/sgd.yaml) come before the others
        name = run_name(section.get("config") or [])
        folders = [f for f in folders if config_of_folder(f.parent.name) == name] or folders
    checkpoint = find_checkpoint(section.ckpt_path, folders, where)
    asked = section.model.as_dict()
    recorded = checkpoint.hyper_parameters
    for key in SPEED_ONLY:
        recorded.pop(key, None)
    unknown = sorted(recorded.keys() - asked.keys())
    if unknown:
        raise CheckpointError(
            f"--ckpt_path {checkpoint.path}: a checkpoint of another model (its arguments "
            f"include {', '.join(unknown[:3])}); pass a checkpoint that this project's fit wrote"
        )
    if recorded:
        config = _merged(parser, config, subcommand, recorded, checkpoint.path)
    section = config[subcommand]
    differing = differences("model", section.model.as_dict(), asked)
    if subcommand == "fit":
        recorded_data = checkpoint.data_hyper_parameters
        data = {key: recorded_data[key] for key in TRAINING_ORDER if key in recorded_data}
        differing += differences("data", data, {key: section.data.get(key) for key in data})
    if differing:
        shown = ", ".join(differing[:3])
        more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
        if subcommand == "fit":
            own_config = checkpoint.path.parent.parent / "config.yaml"
            remedy = f"--config {own_config}" if own_config.is_file() else "the run's own config"
            raise CheckpointError(
                f"--ckpt_path {checkpoint.path}: the checkpoint was trained with {shown}{more}; "
                "a resumed run keeps its model and data order, so drop the other values or "
                f"resume with {remedy}"
            )
        print(f"note: {subcommand} uses the checkpoint's {shown}{more}", file=sys.stderr)
    return config, checkpoint


def _merged(parser: Any, config: Any, subcommand: str, model: dict, path: Path) -> Any:
    """``config`` with the checkpoint's model arguments, checked by the parser as a config's
    are; a value the parser refuses is a one-line error that names the checkpoint."""
    exit_on_error, parser.exit_on_error = parser.exit_on_error, False
    try:
        return parser.parse_object({subcommand: {"model": model}}, config)
    except ArgumentError as err:
        message = " ".join(str(err).split())
        raise CheckpointError(
            f"--ckpt_path {path}: hyper_parameters: {message}; {REFUSING}"
        ) from None
    finally:
        parser.exit_on_error = exit_on_error
