"""Run folders: each new run claims its own, and later commands find the runs' checkpoints.

Where a run's files go follows Lightning: ``<save_dir>/<name>/version_N/`` with the
TensorBoard logger (``lightning_logs/version_N/`` by default), ``<default_root_dir>/`` without
a logger, and checkpoints in the run's ``checkpoints/`` or in ``--checkpoint.dirpath``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from fashion_lightning.errors import CheckpointError

LAST_CHECKPOINT = "last.ckpt"
# ModelCheckpoint's names for the last checkpoint: last.ckpt, or last-v1.ckpt, last-v2.ckpt...
# when a folder already holds another run's (several runs without a logger share a folder)
LAST_CHECKPOINT_PATTERNS = ("last.ckpt", "last-v*.ckpt")


class RunFolderLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, except that each new run claims its ``version_N`` atomically
    and the ``epoch`` counter is not written.

    Lightning picks the next ``version_N`` by listing the folder, so runs started together can
    pick the same one and mix their logs and checkpoints. Here the folder is created with
    ``mkdir``, which fails if another process got there first, and then the next number is
    tried. This is the project's default logger; its arguments are TensorBoardLogger's.
    """

    _claimed: str | None = None  # the folder this logger created, while it may be unused

    def _get_next_version(self) -> int:  # the logger's hook for a new run's version
        version = super()._get_next_version()
        # only process 0 writes; the other DDP processes take its folder (Lightning broadcasts it)
        if rank_zero_only.rank != 0 or not _is_local_file_protocol(self.root_dir):
            return version
        os.makedirs(self.root_dir, exist_ok=True)
        while True:
            try:
                folder = os.path.join(self.root_dir, f"version_{version}")
                os.mkdir(folder)
                self._claimed = folder
                return version
            except FileExistsError:
                version += 1

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        # Lightning adds the epoch number to every write: in TensorBoard a staircase that sorts
        # first among the charts and can't serve as an x-axis; the steps already order the run
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    def release_unused_folder(self) -> None:
        """Remove the claimed folder if nothing was written into it: Lightning reads the run
        folder's name (and so claims it) before it checks the data, which can still fail."""
        claimed = self._claimed
        if claimed is not None and os.path.isdir(claimed) and not os.listdir(claimed):
            os.rmdir(claimed)


def default_logger(save_dir: str | os.PathLike) -> RunFolderLogger:
    """The logger a run gets when the config names none (Lightning's default, claimed atomically)."""
    return RunFolderLogger(save_dir=save_dir, version=SLURMEnvironment.job_id())


def continue_run(logger: TensorBoardLogger | CSVLogger, run_dir: Path, last_step: int) -> None:
    """Make ``logger`` write into an earlier run's folder (a resumed run); in TensorBoard, hide
    what that run logged after ``last_step`` so that no step appears twice."""
    # the loggers take the version only in their constructor; nothing has read it yet
    logger._version = run_dir.name
    if isinstance(logger, TensorBoardLogger):
        logger._kwargs["purge_step"] = last_step + 1


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


def best_checkpoint_of(last: Path) -> Path | None:
    """The best checkpoint of the run whose last checkpoint is ``last``, as its ModelCheckpoint
    recorded it (the file, or the file of that name next to ``last`` if the run was moved)."""
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    for key, state in checkpoint.get("callbacks", {}).items():
        if "Checkpoint" in key and state.get("best_model_path"):
            recorded = Path(state["best_model_path"])
            for candidate in (recorded, last.parent / recorded.name):
                if candidate.is_file():
                    return candidate
    return None
