"""What a command checks before it runs, so that what would fail later (after a run folder
exists, with a traceback) is one line now."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint, StochasticWeightAveraging

from fashion_lightning.checkpoints import check_fits, check_restores_into
from fashion_lightning.errors import ConfigError, UserError
from fashion_lightning.fashion_mnist import CLASS_TAGS
from fashion_lightning.files import ensure_writable_dir
from fashion_lightning.run_checkpoints import RunCheckpoint, run_checkpoint

# callbacks that report no metric of their own: Lightning's, the project's, Optuna's pruning
REPORT_NO_METRICS = ("lightning.", "fashion_lightning.", "optuna_integration.")


def check_optimizer(model: Any) -> None:
    """Build the optimizer once: a value torch refuses (a negative learning rate) is a
    one-line error before a run folder exists."""
    try:
        optimizer = model.optimizer(model.parameters())
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--model.optimizer: {err}") from None
    for group in optimizer.param_groups:
        for key, value in group.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--model.optimizer.init_args.{key} {value}: not a finite number")


def check_validation_interval(trainer: L.Trainer, datamodule: Any) -> None:
    """A validation every N batches within an epoch needs N batches in the epoch (Lightning
    would say so with a traceback once the run has begun)."""
    every = trainer.val_check_interval
    if isinstance(every, int) and trainer.check_val_every_n_epoch is not None:
        batches = datamodule.training_batches(trainer)
        if every > batches:
            raise ConfigError(
                f"--trainer.val_check_interval {every}: an epoch has {batches} training "
                f"batches; validate every {batches} or fewer, at a share of the epoch "
                "(0.5), or pass --trainer.check_val_every_n_epoch null to count batches "
                "across epochs"
            )


def check_writable(folder: Path, what: str, option: str) -> None:
    try:
        ensure_writable_dir(folder)
    except OSError as err:
        raise UserError(
            f"cannot write {what} to {folder} ({err}); pass a writable {option}"
        ) from None


def check_run_folders(trainer: L.Trainer, fitting: bool, logger_configured: bool) -> None:
    """The run's log root, and its checkpoint folder when it trains, can be written."""
    logger = trainer.logger
    root = getattr(logger, "root_dir", None) if logger is not None else None
    option = "--trainer.logger.save_dir" if logger_configured else "--trainer.default_root_dir"
    check_writable(Path(root or trainer.default_root_dir), "run outputs", option)
    callback = run_checkpoint(trainer)
    if fitting and callback is not None and callback.dirpath:
        check_writable(Path(callback.dirpath), "checkpoints", "--checkpoint.dirpath")


def check_accelerator(accelerator: Any) -> None:
    if not isinstance(accelerator, str) or accelerator.lower() not in ("gpu", "cuda", "mps"):
        return
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if not {"gpu": cuda or mps, "cuda": cuda, "mps": mps}[accelerator.lower()]:
        raise UserError(
            f"--trainer.accelerator {accelerator}: PyTorch sees no such device on this "
            f"machine (torch {torch.__version__}, CUDA available: {cuda}); use "
            "--trainer.accelerator auto or cpu, or a PyTorch build for your GPU"
        )


def check_callbacks(callbacks: list[Callback]) -> None:
    for callback in callbacks:
        if isinstance(callback, OnExceptionCheckpoint):
            raise ConfigError(
                "--trainer.callbacks OnExceptionCheckpoint: this project keeps the state of a "
                "stop itself (Ctrl+C and SIGTERM write last.ckpt of the exact step; an error "
                "leaves the last good one), and Lightning would resume any fit from that "
                "callback's file and delete it afterwards; drop it"
            )
        if isinstance(callback, StochasticWeightAveraging):
            raise ConfigError(
                "--trainer.callbacks StochasticWeightAveraging: its average reaches neither the "
                "checkpoints nor the test; use --trainer.callbacks+=WeightAveraging (an equal "
                "average, as SWA's) or EMAWeightAveraging, which this project keeps end to end"
            )


def check_checkpoint_names(trainer: L.Trainer) -> None:
    """Each checkpoint callback's file name stays in its folder (``../../x`` would write
    ``x.ckpt`` four folders up, over what is there)."""
    for callback in trainer.checkpoint_callbacks:
        name = re.sub(r"\{[^}]*\}", "x", callback.filename or "")  # {epoch}... filled in later
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConfigError(
                f"--checkpoint.filename {callback.filename}: a checkpoint's name is a file name "
                "inside its folder, without '..' or a leading '/'; choose the folder with "
                "--checkpoint.dirpath"
            )


def check_logger_folders(loggers: Any, new_run: bool) -> None:
    """A configured logger's ``name``, ``version`` and ``sub_dir`` are folders inside its
    ``save_dir`` (``../..`` would write its logs elsewhere), and a new run's logger writes
    into a folder of its own: one named by a pinned ``version`` that already holds files is
    another run's, or the user's (a CSV log replaces the ``metrics.csv`` and ``hparams.yaml``
    it finds there). ``--ckpt_path last`` continues a run in its own folder."""
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(logger, "init_args", None) or {}
        if not hasattr(init_args, "get"):
            continue
        for key in ("name", "version", "sub_dir"):
            value = init_args.get(key)
            if isinstance(value, str) and (Path(value).is_absolute() or ".." in Path(value).parts):
                raise ConfigError(
                    f"--trainer.logger.init_args.{key} {value}: a folder inside the logger's "
                    "save_dir, without '..' or a leading '/'; choose where logs go with save_dir"
                )
        version = init_args.get("version")
        if not new_run or version is None or init_args.get("save_dir") is None:
            continue
        name = init_args.get("name") or ""
        folder = Path(
            init_args["save_dir"],
            name,
            version if isinstance(version, str) else f"version_{version}",
        )
        if folder.is_dir() and any(folder.iterdir()):
            raise ConfigError(
                f"--trainer.logger.init_args.version {version}: {folder} holds files already "
                "(another run's, or yours); a new run logs into a new folder: drop the version, "
                "or continue that run with --ckpt_path last"
            )


def check_monitors(trainer: L.Trainer, model: Any) -> None:
    """What a run monitors (a checkpoint's or EarlyStopping's ``monitor``, a plateau scheduler's)
    must be a metric the model reports: a typo (``val/los``) is one line before training, where
    Lightning would stop after the first epoch with a traceback. A callback of your own may
    report metrics of its own: with one in the run, Lightning checks them itself."""
    plateau = model.plateau_monitor()
    if plateau is not None and model.scheduler_interval == "step":
        raise ConfigError(
            "--model.scheduler_interval step: ReduceLROnPlateau follows a metric measured once "
            "an epoch; use --model.scheduler_interval epoch"
        )
    if not all(type(c).__module__.startswith(REPORT_NO_METRICS) for c in trainer.callbacks):
        return
    wanted = [
        (
            "--checkpoint.monitor"
            if isinstance(c, RunCheckpoint)
            else f"{type(c).__name__}'s monitor",
            c.monitor,
        )
        for c in trainer.callbacks
        if isinstance(getattr(c, "monitor", None), str)
    ]
    if plateau is not None:
        own = "monitor" in getattr(model.lr_scheduler, "keywords", {})  # Lightning's class
        wanted.append((f"--model.{'lr_scheduler.' if own else 'scheduler_'}monitor", plateau))
    known = model.monitorable_metrics()
    for option, monitor in wanted:
        # a checkpoint may also rank by Lightning's own "epoch" and "step"
        if monitor not in known and not (
            option == "--checkpoint.monitor" and monitor in ("epoch", "step")
        ):
            shown = [name for name in known if not name.startswith("val/acc_class/")]
            shown.insert(2, f"val/acc_class/{{{','.join(CLASS_TAGS)}}}")
            raise ConfigError(
                f"{option} {monitor}: the run reports no metric of that name; it reports "
                f"{', '.join(shown)}"
            )


def check_command(
    subcommand: str,
    trainer: L.Trainer,
    model: Any,
    datamodule: Any,
    checkpoint: Any,
    logger_configured: bool,
) -> None:
    """Everything a command checks once its Trainer is built and before it runs: what would
    otherwise fail later, after a run folder exists, with a traceback."""
    fitting = subcommand == "fit"
    if fitting:
        check_optimizer(model)
        check_validation_interval(trainer, datamodule)
        check_monitors(trainer, model)
    if checkpoint is not None:
        check_fits(checkpoint, model)
        check_restores_into(checkpoint, trainer, model, fitting)
    check_checkpoint_names(trainer)
    check_run_folders(trainer, fitting, logger_configured)
    note_slow_bfloat16(trainer)
    if subcommand in ("validate", "test") and checkpoint is None:
        print(
            f"note: {subcommand} without --ckpt_path measures the untrained model; "
            "pass --ckpt_path best, last or a checkpoint file to measure a trained one",
            file=sys.stderr,
        )


def cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX)."""
    # torch has no public query: this is the one its oneDNN kernels decide by
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported and supported())


def note_slow_bfloat16(trainer: L.Trainer) -> None:
    """A bfloat16 run on a CPU without bfloat16 instructions is emulated in software, about
    twenty times slower than float32 (measured on an AVX2 CPU): say so before it starts."""
    precision = str(trainer.precision)
    if (
        precision.startswith("bf16")
        and isinstance(trainer.accelerator, CPUAccelerator)
        and not cpu_has_bfloat16()
    ):
        print(
            f"note: --trainer.precision {precision} on this CPU (no bfloat16 instructions) "
            "runs many times slower than 32-true; pass --trainer.precision 32-true",
            file=sys.stderr,
        )


def check_version_counters(config: Any) -> None:
    """A checkpoint callback never writes over a file that is there: Lightning names its file
    ``-v1``, ``-v2``... unless ``enable_version_counter`` is off."""
    callbacks = config.trainer.get("callbacks") or []
    settings = [("--checkpoint.enable_version_counter", config.get("checkpoint"))]
    settings += [
        ("--trainer.callbacks.enable_version_counter", getattr(c, "init_args", None))
        for c in (callbacks if isinstance(callbacks, list) else [callbacks])
    ]
    for option, init_args in settings:
        if init_args is not None and init_args.get("enable_version_counter") is False:
            raise ConfigError(
                f"{option} false: a checkpoint would be written over a file of the same name "
                "that is there already (another run's, or yours); leave it on"
            )


def check_run_folder_links(run_dir: Path) -> None:
    """The folder a resumed run continues in holds no symbolic links: what the run writes
    there (its config, hparams.yaml, metrics.csv, checkpoints) would go through them to
    wherever they point."""
    for folder in (run_dir, run_dir / "checkpoints"):
        links = sorted(p for p in folder.iterdir() if p.is_symlink()) if folder.is_dir() else []
        if links:
            raise UserError(
                f"--ckpt_path last: {links[0]} is a symbolic link in the run folder this run "
                "continues in, and the run would write through it; remove it (or continue from "
                "a copy of the folder without links)"
            )
