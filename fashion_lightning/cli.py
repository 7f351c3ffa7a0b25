"""``python -m fashion_lightning {fit,validate,test,predict} --config configs/sgd.yaml``."""

from __future__ import annotations

import errno
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fashion_lightning.callbacks import (
    AtomicCheckpointIO,
    ResumableTraining,
    RunCheckpoint,
    os_error_in,
)
from fashion_lightning.data import FashionMNISTDataModule
from fashion_lightning.errors import CheckpointError, ConfigError, UserError
from fashion_lightning.model import ImageClassifier
from fashion_lightning.predict import PredictionWriter
from fashion_lightning.raw_files import ensure_writable_dir
from fashion_lightning.runs import (
    RunFolderLogger,
    best_checkpoint_of,
    checkpoint_folders,
    continue_run,
    default_logger,
    newest_last_checkpoint,
)
from fashion_lightning.visuals import ClassificationImages, HParamsSummary

DEBUG_ENV = "FASHION_LIGHTNING_DEBUG"
PLAIN_TENSORBOARD = (
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.tensorboard.TensorBoardLogger",
)
# the data values that decide which images a run trains on, in which order: fixed on resume
TRAINING_ORDER = ("batch_size", "seed", "val_size")
PROGRESS_BAR_REFRESH_RATE = 10  # batches between redraws of the default progress bar
# what a failed write of run outputs looks like (a full disk, a quota, a file-size limit)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}

# ResumableTraining makes a mid-epoch resume exact; Lightning cannot see that and warns.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")


class OneLineErrorParser(LightningArgumentParser):
    """jsonargparse's parser, with its errors as one line: jsonargparse breaks some messages in
    two and prints the whole usage first, about 80 lines for this CLI."""

    def error(self, message: str, ex: Exception | None = None):
        message = " ".join(message.split())
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # raises, as jsonargparse does inside its own parsing
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        print(f"error: {message} (see: {prog} --help)", file=sys.stderr)
        sys.exit(2)


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


def read_checkpoint(path: Path) -> dict:
    """Load the checkpoint at ``path``; CheckpointError if it is missing, empty or unreadable."""
    if not path.is_file():
        raise CheckpointError(
            f"--ckpt_path {path}: no such file. Runs keep theirs in "
            "lightning_logs/version_N/checkpoints/; --ckpt_path last takes the newest"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"--ckpt_path {path}: the file is empty; pick another checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"--ckpt_path {path}: not a readable checkpoint, truncated or not a PyTorch file "
            f"({type(err).__name__}); pick another checkpoint"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"--ckpt_path {path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def check_checkpoint_fits(path: Path, checkpoint: dict, model: torch.nn.Module) -> None:
    """CheckpointError unless the checkpoint's weights have the names and shapes of ``model``'s."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(getattr(t, "shape", ())) for name, t in checkpoint["state_dict"].items()}
    if found != expected:
        differences = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise CheckpointError(
            f"--ckpt_path {path}: a checkpoint of another model (differs in "
            f"{', '.join(f'{name} {shape}' for name, shape in differences)}); "
            "pass a checkpoint that this project's fit wrote"
        )


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config branch as ``{"optimizer.init_args.lr": 0.001, ...}``."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if not isinstance(value, dict):
        return {prefix: value}
    flattened = {}
    for key, item in value.items():
        flattened.update(flat(item, f"{prefix}.{key}" if prefix else key))
    return flattened


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
            ours, others = flat(mine, key), flat(theirs, key)
            leaves = sorted(k for k in ours.keys() | others.keys() if ours.get(k) != others.get(k))
            shown += [
                f"{group}.{k} {_value(ours.get(k))} (asked: {_value(others.get(k))})"
                for k in leaves
            ]
        else:
            shown.append(f"{group}.{key} {_value(mine)} (asked: {_value(theirs)})")
    return sorted(shown)


def _value(value: Any) -> str:
    if isinstance(value, dict) and "class_path" in value:
        return value["class_path"]
    return "none" if value is None else str(value)


def plain_numbers(config: Namespace) -> None:
    """Turn jsonargparse's restricted numbers (``PositiveInt``...) in ``config`` into ``int`` and
    ``float``: Lightning stores the model's arguments in checkpoints, and ``torch.load`` with
    ``weights_only=True`` (Lightning's own, and ours) refuses any other class."""
    for key, value in config.items():
        if isinstance(value, int) and not isinstance(value, bool) and type(value) is not int:
            config[key] = int(value)
        elif isinstance(value, float) and type(value) is not float:
            config[key] = float(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Namespace):
                    plain_numbers(item)


def config_files(args: list[str]) -> list[Path]:
    """The files that ``--config``/``-c`` name in a command line."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def config_file_problem(path: Path) -> str | None:
    """What makes ``path`` unusable as a config that jsonargparse would only say vaguely."""
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None  # missing files and YAML syntax errors get jsonargparse's own message
    if content is None:
        return "the file is empty (or only comments)"
    if not isinstance(content, dict):
        return f"it holds a {type(content).__name__}, not settings"
    for group in ("trainer", "model", "data", "checkpoint", "images"):
        value = content.get(group)
        if value is not None and not isinstance(value, dict):
            return f"'{group}:' holds {value!r}, not settings"
    return None


class FashionCLI(LightningCLI):
    """LightningCLI with this project's defaults: best-on-``val/acc`` and last checkpoints,
    TensorBoard logs under ``lightning_logs/``, resumable runs, and a test pass after ``fit``."""

    def __init__(
        self,
        *args,
        run_dir: Path | None = None,
        test_after_fit: bool = True,
        searched: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        """``run_dir``: log into this folder instead of a new ``lightning_logs/version_N``;
        ``test_after_fit``: test the best checkpoint after ``fit`` (a search must not);
        ``searched``: a search trial's sampled values, first columns of TensorBoard's HParams."""
        self._checkpoint: tuple[Path, dict] | None = None  # --ckpt_path, resolved and read
        self._resuming_last = False
        self.run_dir = run_dir
        self.test_after_fit = test_after_fit
        self.searched = searched
        super().__init__(
            *args,
            parser_class=OneLineErrorParser,
            # the optimizer is set in one place, model.optimizer; LightningCLI would also offer
            # --optimizer, which replaces it in training but not in hparams.yaml or TensorBoard
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ClassificationImages, "images")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:02d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        command_line = sys.argv[1:] if args is None else args
        if isinstance(command_line, list):
            for path in config_files(command_line):
                problem = config_file_problem(path)
                if problem:
                    parser.error(
                        f"--config {path}: {problem}; a config maps trainer:, model: and data: "
                        "to their settings, as configs/sgd.yaml does"
                    )
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path`` (``last``, ``best`` or a file) and check it before Lightning
        reads the model's hyperparameters from it (its own read of a damaged file is a
        traceback), then refuse or report values that the checkpoint overrides."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        ckpt_path = config.get("ckpt_path") if config else None
        if ckpt_path is None:
            return
        path = self._checkpoint_file(ckpt_path, config)
        self._checkpoint = (path, read_checkpoint(path))
        self._resuming_last = subcommand == "fit" and ckpt_path == "last"
        config.ckpt_path = str(path)
        asked = config.model.as_dict()
        super()._parse_ckpt_path()  # a new config, with the checkpoint's model arguments
        differing = differences("model", self.config[subcommand].model.as_dict(), asked)
        if subcommand == "fit":  # the data values that decide which images train in which order
            recorded = self._checkpoint[1].get("datamodule_hyper_parameters") or {}
            data = {key: recorded[key] for key in TRAINING_ORDER if key in recorded}
            given = {key: config.data.get(key) for key in data}
            differing += differences("data", data, given)
        if not differing:
            return
        shown = ", ".join(differing[:3])
        more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
        if subcommand == "fit":
            own_config = path.parent.parent / "config.yaml"
            remedy = f"--config {own_config}" if own_config.is_file() else "the run's own config"
            raise CheckpointError(
                f"--ckpt_path {path}: the checkpoint was trained with {shown}{more}; a resumed "
                f"run keeps its model and data order, so drop the other values or resume with "
                f"{remedy}"
            )
        print(f"note: {subcommand} uses the checkpoint's {shown}{more}", file=sys.stderr)

    def _checkpoint_file(self, ckpt_path: str, config: Namespace) -> Path:
        """The file that ``--ckpt_path`` means: itself, or the newest run's last or best."""
        if ckpt_path not in ("last", "best"):
            return Path(ckpt_path)
        folders, where = checkpoint_folders(
            config.trainer.default_root_dir, config.trainer.logger, config.checkpoint.dirpath
        )
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
        if ckpt_path == "last":
            return last
        best = best_checkpoint_of(last)
        if best is None:
            raise CheckpointError(
                f"--ckpt_path best: the newest run ({last.parent}) records no best checkpoint "
                "that still exists; pass a checkpoint file to --ckpt_path"
            )
        return best

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        plain_numbers(config)
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, Namespace) and logger.class_path in PLAIN_TENSORBOARD:
                # the same logger, except that a new run claims its folder atomically
                logger.class_path = f"{RunFolderLogger.__module__}.{RunFolderLogger.__name__}"
        accelerator = config.trainer.accelerator
        if isinstance(accelerator, str) and accelerator.lower() in ("gpu", "cuda", "mps"):
            cuda = torch.cuda.is_available()
            mps = torch.backends.mps.is_available()
            found = {"gpu": cuda or mps, "cuda": cuda, "mps": mps}[accelerator.lower()]
            if not found:
                raise UserError(
                    f"--trainer.accelerator {accelerator}: PyTorch sees no such device on this "
                    f"machine (torch {torch.__version__}, CUDA available: {cuda}); use "
                    "--trainer.accelerator auto or cpu, or a PyTorch build for your GPU"
                )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if self.run_dir is not None:  # given by the caller, not the config: config.yaml reruns
            kwargs["logger"] = RunFolderLogger(
                self.run_dir.parent, name="", version=self.run_dir.name
            )
        elif config.get("logger") in (None, True) and not config.get("barebones"):
            kwargs["logger"] = default_logger(config.get("default_root_dir") or os.getcwd())
        # what the user configured: Lightning adds its own callbacks to this same list
        user_callbacks = config.get("callbacks") or []
        user_callbacks = list(
            user_callbacks if isinstance(user_callbacks, list) else [user_callbacks]
        )
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(ResumableTraining())
        if trainer.logger is not None:
            trainer.callbacks.append(HParamsSummary(self.searched))
        if self.subcommand == "predict":
            trainer.callbacks.append(PredictionWriter())
        if not any(isinstance(callback, ProgressBar) for callback in user_callbacks):
            self._slow_down_default_progress_bar(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    @staticmethod
    def _slow_down_default_progress_bar(trainer: Trainer) -> None:
        """Refresh Lightning's default progress bar every few batches instead of every batch.

        Redrawing it after every one of this model's ~2 ms steps costs up to 10% of an epoch.
        """
        bar = trainer.progress_bar_callback
        if type(bar) is TQDMProgressBar and bar.refresh_rate == 1:
            trainer.callbacks[trainer.callbacks.index(bar)] = TQDMProgressBar(
                refresh_rate=PROGRESS_BAR_REFRESH_RATE
            )

    def _check_inputs(self) -> None:
        """Turn the expected failures after parsing into one-line errors, before any work."""
        if self._checkpoint is not None:
            path, checkpoint = self._checkpoint
            check_checkpoint_fits(path, checkpoint, self.model)
            if self._resuming_last:
                self._continue_run_folder(path, checkpoint["global_step"])
        if self.subcommand == "fit":
            self._check_optimizer()
        self._check_writable(self._log_root(), "run outputs", self._root_option())
        checkpoint_folder = self.trainer.checkpoint_callback
        if self.subcommand == "fit" and checkpoint_folder and checkpoint_folder.dirpath:
            self._check_writable(
                Path(checkpoint_folder.dirpath), "checkpoints", "--checkpoint.dirpath"
            )
        if self.subcommand in ("validate", "test") and self._checkpoint is None:
            print(
                f"note: {self.subcommand} without --ckpt_path measures the untrained model; "
                "pass --ckpt_path best, last or a checkpoint file to measure a trained one",
                file=sys.stderr,
            )

    def _check_optimizer(self) -> None:
        """Build the optimizer once, so that a value torch refuses (a negative learning rate)
        is a one-line error before a run folder exists, not a traceback after."""
        try:
            self.model.optimizer(self.model.parameters())
        except (ValueError, TypeError) as err:
            raise ConfigError(f"--model.optimizer: {err}") from None

    def _log_root(self) -> Path:
        logger = self.trainer.logger
        root = getattr(logger, "root_dir", None) if logger is not None else None
        return Path(root or self.trainer.default_root_dir)

    def _root_option(self) -> str:
        configured = isinstance(self._get(self.config, "trainer").logger, Namespace)
        return "--trainer.logger.save_dir" if configured else "--trainer.default_root_dir"

    @staticmethod
    def _check_writable(folder: Path, what: str, option: str) -> None:
        try:
            ensure_writable_dir(folder)
        except OSError as err:
            raise UserError(
                f"cannot write {what} to {folder} ({err}); pass a writable {option}"
            ) from None

    def _continue_run_folder(self, checkpoint: Path, global_step: int) -> None:
        """Log into the resumed run's own ``version_N`` so its curves continue in TensorBoard."""
        logger = self.trainer.logger
        run_dir = checkpoint.parent.parent
        if (
            isinstance(logger, (TensorBoardLogger, CSVLogger))
            and run_dir.parent.resolve() == Path(logger.root_dir).resolve()
        ):
            continue_run(logger, run_dir, global_step)

    def before_fit(self) -> None:
        self._check_inputs()

    def before_validate(self) -> None:
        self._check_inputs()

    def before_test(self) -> None:
        self._check_inputs()

    def before_predict(self) -> None:
        self._check_inputs()

    # LightningCLI runs a method of this class in place of the Trainer's of the same name
    def fit(self, **kwargs) -> None:
        self._reporting_write_errors(self.trainer.fit, **kwargs)

    def validate(self, **kwargs) -> None:
        self._reporting_write_errors(self.trainer.validate, **kwargs)

    def test(self, **kwargs) -> None:
        self._reporting_write_errors(self.trainer.test, **kwargs)

    def predict(self, **kwargs) -> None:
        self._reporting_write_errors(self.trainer.predict, **kwargs)

    def _reporting_write_errors(self, run, **kwargs) -> None:
        """Run a Trainer method; a failed write (a full disk) becomes one line that names the
        file, the cause and the newest checkpoint that is still complete."""
        try:
            with warnings.catch_warnings():
                if self.subcommand != "fit":  # evaluation restores no checkpoint bookkeeping
                    warnings.filterwarnings("ignore", message="The dirpath has changed from")
                run(**kwargs)
        except Exception as err:
            if isinstance(self.trainer.logger, RunFolderLogger):
                self.trainer.logger.release_unused_folder()
            cause = os_error_in(err)
            if cause is None or cause.errno not in WRITE_ERRNOS:
                raise
            target = cause.filename or f"the run outputs in {self.trainer.log_dir}"
            raise UserError(
                f"cannot write {target}: {cause.strerror}; {self._what_is_kept()}"
            ) from err

    def _what_is_kept(self) -> str:
        """What a user whose disk filled up still has, and what to do next."""
        if self.subcommand != "fit":
            return "free space and run again"
        callback = self.trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else None
        kept = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns) if folder else []
        if not kept:
            return "no checkpoint was written yet; free space and run again"
        return (
            f"the newest complete checkpoint is {kept[-1]}; free space, then continue with "
            "--ckpt_path last"
        )

    def after_fit(self) -> None:
        """Evaluate the best checkpoint on the official test split, as the tutorial does."""
        if self.trainer.interrupted or not self.test_after_fit:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        if best:
            # The weights are loaded here rather than by test(ckpt_path=best): during fit,
            # Lightning's WeightAveraging callbacks (EMAWeightAveraging...) put the raw training
            # weights back when a checkpoint loads, while the checkpoint holds (and was chosen
            # for) the averaged ones that a later `test --ckpt_path` measures.
            print(f"Testing the best checkpoint {best}", file=sys.stderr)
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            self.model.load_state_dict(state)
        self.test(model=self.model, datamodule=self.datamodule)


def _report(err: BaseException, exit_code: int) -> None:
    if os.environ.get(DEBUG_ENV):
        raise err
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    sys.exit(exit_code)


def _missing_module(err: BaseException) -> ModuleNotFoundError | None:
    while err is not None and not isinstance(err, ModuleNotFoundError):
        err = err.__cause__ or err.__context__
    return err


def _quiet_write_errors_in_threads(args) -> None:
    """TensorBoard writes from a thread: its failed write (a full disk) surfaces again in the
    main thread, which reports it in one line; don't print the thread's traceback too."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRNOS:
        return
    threading.__excepthook__(args)


def run(
    args: list[str],
    run_dir: Path | None = None,
    callbacks: list[Callback] | None = None,
    test_after_fit: bool = True,
    searched: dict[str, Any] | None = None,
) -> FashionCLI:
    """Run a command line in this process and return the CLI with its trainer, for callers such
    as the hyperparameter search: the run logs into ``run_dir``, with ``callbacks`` added to
    the trainer's (not to its config.yaml), and errors are raised, not printed."""
    threading.excepthook = _quiet_write_errors_in_threads
    return FashionCLI(
        ImageClassifier,
        FashionMNISTDataModule,
        args=args,
        save_config_callback=SaveRunConfig,
        trainer_defaults={"callbacks": callbacks or []},
        run_dir=run_dir,
        test_after_fit=test_after_fit,
        searched=searched,
    )


def main(args: list[str] | None = None) -> None:
    """Command-line entry point; ``args`` replaces ``sys.argv[1:]`` (tests pass a list).

    Errors a user can fix print one line and exit non-zero; set FASHION_LIGHTNING_DEBUG=1 for
    the traceback.
    """
    try:
        run(args)
    except UserError as err:
        _report(err, err.exit_code)
    except SIGTERMException:
        # Lightning exits 0 on SIGTERM outside training; a scheduler would read that as success
        print("error: stopped by SIGTERM", file=sys.stderr)
        sys.exit(143)
    except MisconfigurationException as err:  # Lightning refused a value of the config
        _report(err, 2)
    except Exception as err:
        missing = _missing_module(err)  # e.g. a callback named in the config needs a package
        if missing is None:
            raise
        _report(missing, 1)
