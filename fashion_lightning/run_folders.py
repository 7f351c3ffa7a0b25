"""A run's folder: each new run claims its own, a resumed run continues its own, and each
command's config is kept there without overwriting another's.

Lightning's loggers pick ``version_N`` by listing the folder, so runs started together can
pick the same one and mix their logs and checkpoints. Here the folder is created with
``mkdir``, which fails if another process got there first, and then the next number is tried.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from fashion_lightning.files import atomic_write, claim_file
from fashion_lightning.run_logs import EVENTS_PREFIX, event_records, last_steps
from fashion_lightning.run_records import CONFIG_FILE, EPOCHS_DONE
from fashion_lightning.visuals import EPOCH_CURVES

PROCESS_STARTED = time.time()  # files of this process's pid from before are another's


def claim_version(folder: Path, prefix: str = "version_") -> str:
    """The lowest free ``<prefix>N`` in ``folder``, created (and so claimed) by this process."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = [
        int(p.name.removeprefix(prefix))
        for p in folder.glob(f"{glob.escape(prefix)}*")
        if p.name.removeprefix(prefix).isdigit()
    ]
    number = max(taken, default=-1) + 1
    while True:
        try:
            (folder / f"{prefix}{number}").mkdir()
            return f"{prefix}{number}"
        except FileExistsError:
            number += 1


class RunFolderLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, except that a new run claims its folder atomically, the
    folder is named after the run's config (``sgd_0``, ``sgd_1``, ``best_0``; ``version_N``
    without one), the ``epoch`` counter is not written (``train/epochs_done`` marks each whole
    epoch's end instead), and the learning curves are written a second time against epochs
    done (``epoch/acc_val``..., see ``visuals.EPOCH_CURVES``).

    This is the project's default logger, and a ``TensorBoardLogger`` named in a config is
    swapped for it; its arguments are TensorBoardLogger's. The folder is claimed when the run
    first asks for it (not when the logger is built: a command refused before it runs
    leaves nothing behind).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        run_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``run_name``: what a new run's folder is called, numbered (``version_N`` if None)."""
        super().__init__(save_dir, name=name, version=version, **kwargs)
        # only process 0 writes; the other DDP processes take its folder (Lightning broadcasts it)
        self._claims = version is None and rank_zero_only.rank == 0 and "://" not in str(save_dir)
        self._folder_prefix = f"{run_name}_" if run_name else "version_"
        self.claimed: Path | None = None  # the folder this logger created, while it may be unused
        self._made_root = False  # whether claiming it made lightning_logs/ too
        # epochs drawn before a resume: tag -> last step (see continued_logger)
        self.epochs_drawn: dict[str, int] = {}

    @property
    def version(self) -> int | str:
        if self._claims and self.claimed is None:
            folder = Path(self.root_dir)
            self._made_root = not folder.exists()
            self.claimed = folder / claim_version(folder, self._folder_prefix)
        if self.claimed is not None:
            number = self.claimed.name.removeprefix("version_")
            return int(number) if number.isdigit() else self.claimed.name
        return super().version

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        # Lightning adds the epoch number to every write: in TensorBoard a staircase that sorts
        # first among the charts and can't serve as an x-axis; the steps already order the run
        epoch = metrics.get("epoch")
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        super().log_metrics(metrics, step)
        # the learning curves again at the epochs done, an x-axis that runs share
        if epoch is None:
            return
        done = int(epoch) + 1
        if "train/acc" in metrics:  # a whole training epoch's end: where runs counts epochs
            super().log_metrics({EPOCHS_DONE: done}, step)
        curves = {
            EPOCH_CURVES[k]: v
            for k, v in metrics.items()
            if k in EPOCH_CURVES and done > self.epochs_drawn.get(EPOCH_CURVES[k], 0)
        }
        if curves:
            super().log_metrics(curves, done)

    def stop_purging(self) -> None:
        """A resumed run's writer hides what the run had logged after its checkpoint
        (``purge_step``) when it opens; a later stage of the same command (the test after
        ``fit``, which ddp_spawn runs in new processes with a writer of their own) must not
        hide again the steps that fit has just written."""
        self._kwargs.pop("purge_step", None)

    def release_unused_folder(self) -> None:
        """Remove the folder this run claimed if the run logged nothing into it: a command that
        fails before its first value (a refused value, a callback's missing package at setup)
        gives its folder back. What such a run leaves is an events file that holds only its
        header (TensorBoard opens one when a run sets up) and its own config.yaml."""
        claimed = self.claimed
        if claimed is None or not claimed.is_dir():
            return
        files = list(claimed.iterdir())
        if all(_holds_no_values(path) for path in files):
            for path in files:
                path.unlink()
            claimed.rmdir()
            self._give_back_root()

    def _give_back_root(self) -> None:
        """``lightning_logs/`` goes too if claiming the run's folder made it and it is empty."""
        if self._made_root and self.claimed is not None:
            with contextlib.suppress(OSError):  # (not empty: another run's folder is there)
                self.claimed.parent.rmdir()

    def forget_this_command(self, config_file: Path | None) -> None:
        """Remove what this command wrote into its run folder when it failed before anything
        ran: a folder it claimed goes whole (nothing else writes into a claimed folder); in a
        continued run's folder, the config and events files written since it started."""
        if self.claimed is not None:
            if not any(self.claimed.rglob("*.ckpt")):  # (a checkpoint says something ran)
                shutil.rmtree(self.claimed, ignore_errors=True)
                self._give_back_root()
            return
        folder = Path(self.log_dir)
        if rank_zero_only.rank != 0 or not folder.is_dir():  # (process 0 writes the run's files)
            return
        if config_file is not None:
            config_file.unlink(missing_ok=True)
        # (also what the processes ddp_spawn started wrote, whose names this one never learns)
        for path in folder.iterdir():
            ours = path.is_file() and path.stat().st_mtime >= PROCESS_STARTED
            if ours and (path.name.startswith(EVENTS_PREFIX) or CONFIG_FILE.match(path.name)):
                path.unlink()


def claim_before_launch(trainer: Any) -> None:
    """A strategy that starts its processes from this one (``ddp_spawn``, ``ddp_fork``,
    ``ddp_notebook``: Lightning's multiprocessing launcher, private but the only mark they
    share) runs each stage in new children, whose claims never come back here: each process
    claimed a folder of its own, and the test after ``fit`` two more. The run's folder is
    claimed in this process before they start, and they inherit it."""
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        for logger in trainer.loggers:
            if isinstance(logger, RunFolderLogger):
                _ = logger.version  # asking claims it


def _holds_no_values(path: Path) -> bool:
    """A file of a failed run that was given nothing to keep: its config, or an events file
    without a value."""
    if path.is_file() and CONFIG_FILE.match(path.name):
        return True
    if not (path.is_file() and path.name.startswith(EVENTS_PREFIX)):
        return False
    return not any(event.HasField("summary") for event in event_records(path))


def default_logger(save_dir: str | os.PathLike, name: str | None = None) -> RunFolderLogger:
    """The logger a run gets when the config names none: Lightning's default, claimed
    atomically, its folder named ``name``_N (a SLURM job keeps its job id, as in Lightning)."""
    return RunFolderLogger(save_dir=save_dir, version=SLURMEnvironment.job_id(), run_name=name)


def run_logger(
    configured: Any,
    default: bool,
    root: str | os.PathLike,
    name: str | None,
    run_dir: Path | None = None,
    resumed: Any = None,
) -> Logger | None:
    """The logger a command writes with, when it is not simply the ``configured`` one: the
    caller's ``run_dir`` (a search's trial), the run folder of the checkpoint it resumes
    (``resumed``, ``--ckpt_path last``), or a newly claimed folder ``name``_N under ``root``
    (``default``: the config names no logger); None: the configured one as it is."""
    if run_dir is not None:  # given by the caller, not the config: config.yaml reruns
        return RunFolderLogger(run_dir.parent, name="", version=run_dir.name)
    if resumed is not None:
        base = default_logger(root, name) if default else configured
        continued = continued_logger(base, resumed.path.parent.parent, resumed.global_step)
        if continued is not None:
            if isinstance(base, RunFolderLogger):
                base.release_unused_folder()  # claimed by building it; the resume has its own
            return continued
        return base if default else None
    return default_logger(root, name) if default else None


def continued_logger(logger: Logger | None, run_dir: Path, last_step: int) -> Logger | None:
    """A logger like ``logger`` that writes into an earlier run's folder ``run_dir`` (a resumed
    run), or None when ``logger`` does not keep its runs where ``run_dir`` is.

    In TensorBoard what that run logged after ``last_step`` is hidden (``purge_step``), so that
    no step appears twice; a CSV log keeps its rows up to ``last_step``.
    """
    if not isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return None
    if run_dir.parent.resolve() != Path(logger.root_dir).resolve():
        return None
    common = {"save_dir": logger.save_dir, "name": logger.name, "version": run_dir.name}
    if isinstance(logger, TensorBoardLogger):
        cls = type(logger) if isinstance(logger, RunFolderLogger) else RunFolderLogger
        continued = cls(**common, purge_step=last_step + 1)
        # purge_step hides later steps, not the epochs of epoch/*: an epoch drawn before its
        # checkpoint was written (a kill -9 between the two) is not drawn twice
        continued.epochs_drawn = last_steps(run_dir, "epoch/")
        return continued
    metrics = run_dir / "metrics.csv"
    columns, rows = _csv_rows_until(metrics, last_step)
    continued = type(logger)(**common)
    with warnings.catch_warnings():
        # Lightning's CSV writer deletes the folder's metrics.csv when it starts ("Previous log
        # files ... will be deleted"): the rows up to the checkpoint are written back
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = continued.experiment
    if rows:
        with atomic_write(metrics, "w", newline="") as f:
            table = csv.DictWriter(f, fieldnames=columns)
            table.writeheader()
            table.writerows(rows)
        # it also starts with no columns, and would rewrite the file with its new ones only
        writer.metrics_keys[:] = columns
    return continued


def _csv_rows_until(path: Path, last_step: int) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV log's columns (sorted, as Lightning writes them) and its rows up to ``last_step``:
    what a stopped run logged after its checkpoint is trained again."""
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if not row.get("step") or float(row["step"]) <= last_step]
        return sorted(reader.fieldnames or []), rows


class SaveRunConfig(SaveConfigCallback):
    """Saves the config into the run folder as ``config.yaml``, or ``config-2.yaml`` and so on
    when one is there already (a resumed run, a pinned logger version, several runs without a
    logger), so a second run never fails and never overwrites another run's record. The name
    is claimed by creating the file exclusively, so runs that start together get one each."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved:
            log_dir = trainer.log_dir  # a collective call under DDP: every rank makes it once
            name = claim_file(Path(log_dir), "config", ".yaml") if trainer.is_global_zero else None
            self.config_filename = trainer.strategy.broadcast(name)
            self.overwrite = True  # the file is the empty one claimed above
        super().setup(trainer, pl_module, stage)
