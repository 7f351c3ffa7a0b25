"""``python -m fashion_lightning {fit,validate,test,predict} --config configs/sgd.yaml``: the
LightningCLI wiring and the exit codes. What each piece does lives in its own module:
checking configs (:mod:`.configs`), ``--ckpt_path`` (:mod:`.checkpoints`), the checks before
a run (:mod:`.checks`), run folders (:mod:`.run_folders`), stopping and resuming
(:mod:`.resume`), the loop of optimizer steps (:mod:`.steps`), errors (:mod:`.errors`).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any, Literal

import lightning
from jsonargparse import ActionConfigFile, Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fashion_lightning import __version__
from fashion_lightning.checkpoints import (
    Checkpoint,
    read_checkpoint,
    take_checkpoint,
)
from fashion_lightning.checks import (
    check_accelerator,
    check_callbacks,
    check_command,
    check_logger_folders,
    check_run_folder_links,
    check_version_counters,
)
from fashion_lightning.configs import (
    check_model_classes,
    config_file_problem,
    config_files,
    plain_numbers,
    restrict_imports,
    seed_problem,
    with_packaged_configs,
)
from fashion_lightning.data import FashionMNISTDataModule
from fashion_lightning.errors import (
    ConfigError,
    Stopped,
    UserError,
    cause_of,
    exit_with,
    first_line,
    out_of_memory,
    parse_error,
)
from fashion_lightning.failures import (
    command_failure,
    end_their_progress_bar,
    give_back_run_folder,
    quiet_write_errors_in_threads,
    ran_anything,
)
from fashion_lightning.help import CONFIG_HELP, DESCRIPTION, OneLineErrorParser
from fashion_lightning.model import ImageClassifier
from fashion_lightning.predict import PredictionWriter
from fashion_lightning.progress import StepProgressBar
from fashion_lightning.resume import ResumableTraining
from fashion_lightning.run_checkpoints import ResumableCheckpointIO, RunCheckpoint, run_checkpoint
from fashion_lightning.run_folders import (
    RunFolderLogger,
    SaveRunConfig,
    claim_before_launch,
    run_logger,
)
from fashion_lightning.run_records import run_name
from fashion_lightning.steps import choose_training_loop
from fashion_lightning.stops import stop_in_processes
from fashion_lightning.terminal import (
    RunSummary,
    WarningsThatApply,
    quiet_the_resource_tracker,
    quiet_what_does_not_apply,
    results_table,
)
from fashion_lightning.trainer import FashionTrainer
from fashion_lightning.visuals import ClassificationImages, HParamsSummary

# what `fit` runs without a config: configs/sgd.yaml's values beyond the arguments' defaults
TUTORIAL_TRAINER = {"max_epochs": 10}
TUTORIAL_SEED = 42
TUTORIAL_STEPS_PER_CALL = 16  # as the configs: the same run as 1, faster (docs/speed.md)
PLAIN_TENSORBOARD = (
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.tensorboard.TensorBoardLogger",
)


class FashionCLI(LightningCLI):
    """LightningCLI with this project's defaults: best-on-``val/acc`` and last checkpoints,
    TensorBoard logs under ``lightning_logs/``, resumable runs, and a test pass after ``fit``.

    (Longer than the project's other classes because LightningCLI's extension points are its
    methods: one for each step of parsing, building and running; each here is short and hands
    its work to a module.)"""

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
        self.checkpoint: Checkpoint | None = None  # --ckpt_path, found, read and checked
        self.asked_ckpt_path: str | None = None  # as given: last, best or a file
        self.run_dir = run_dir
        self.test_after_fit = test_after_fit
        self.searched = searched
        self.resumable = ResumableTraining()
        self.checkpoint_io: ResumableCheckpointIO | None = None
        restrict_imports()
        # with no config, `fit` runs the tutorial as configs/sgd.yaml does (the model's and
        # data's own defaults are the tutorial's already)
        kwargs["trainer_defaults"] = {**TUTORIAL_TRAINER, **kwargs.get("trainer_defaults", {})}
        kwargs.setdefault("seed_everything_default", TUTORIAL_SEED)
        with quiet_what_does_not_apply():  # LightningCLI parses, builds and runs in __init__
            super().__init__(
                *args,
                parser_class=OneLineErrorParser,
                parser_kwargs={"version": __version__, "description": DESCRIPTION},
                # the optimizer is set in one place, model.optimizer; LightningCLI would also
                # offer --optimizer, which replaces it in training but not in hparams.yaml or
                # TensorBoard
                auto_configure_optimizers=False,
                trainer_class=FashionTrainer,  # --trainer.limit_train_batches 1 is one batch
                **kwargs,
            )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # the Trainer's weights_only is this CLI's own argument (add_arguments_to_parser)
        return {name: {*skip, "weights_only"} for name, skip in LightningCLI.subcommands().items()}

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """LightningCLI's parser, with ``--config``'s help naming the configs the package ships."""
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={lightning.__version__}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument("-c", "--config", action=ActionConfigFile, help=CONFIG_HELP)
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--weights_only",
            type=Literal[True] | None,
            default=None,
            help="Checkpoints are always read with torch.load(weights_only=True): they are "
            "data, and may not run code (docs/trust.md); false is refused",
        )
        parser.add_lightning_class_args(ClassificationImages, "images")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "model.steps_per_call": TUTORIAL_STEPS_PER_CALL,
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:02d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    # --- parsing -------------------------------------------------------------------------

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
        subcommand = self.config.get("subcommand")
        seed = (self.config[subcommand] if subcommand else self.config).get("seed_everything")
        if seed_problem(seed):
            prog = f"{parser.prog} {subcommand}" if subcommand else parser.prog
            parse_error(prog, f"--seed_everything {seed}: {seed_problem(seed)}")
        if subcommand and self.config[subcommand].get("ckpt_path") is not None:
            self.asked_ckpt_path = self.config[subcommand].ckpt_path
            self.config, self.checkpoint = take_checkpoint(parser, self.config, subcommand)
            # LightningCLI's own merge of the checkpoint (which reads the file again, unchecked)
            # finds no path: it is held back until the classes are built
            self.config[subcommand].ckpt_path = None

    def _section(self, config: Namespace) -> Namespace:
        """The part of a config for this command (all of it without subcommands)."""
        return config[self.subcommand] if self.subcommand else config

    def before_instantiate_classes(self) -> None:
        config = self._section(self.config)
        if self.checkpoint is not None:
            config.ckpt_path = str(self.checkpoint.path)
        plain_numbers(config)
        check_model_classes(config.model)
        continuing = self.subcommand == "fit" and self._resuming_last()
        check_logger_folders(config.trainer.logger, new_run=not continuing)
        check_version_counters(config)
        if continuing:
            check_run_folder_links(self.checkpoint.path.parent.parent)
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, Namespace) and logger.class_path in PLAIN_TENSORBOARD:
                # the same logger, except that a new run claims its folder atomically
                logger.class_path = f"{RunFolderLogger.__module__}.{RunFolderLogger.__name__}"
        check_accelerator(config.trainer.accelerator)

    # --- the Trainer ---------------------------------------------------------------------

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The configured Trainer, plus what every run of the project has: its run folder's
        logger, the stop-and-resume callback, the atomic checkpoint IO, TensorBoard's HParams."""
        config = self._section(self.config_init).trainer
        logger = self._logger(config)
        if logger is not None:
            kwargs["logger"] = logger
        callbacks = _as_list(config.get("callbacks"))
        check_callbacks(callbacks)
        checkpoint = self.checkpoint.path if self.checkpoint is not None else None
        self.resumable.checkpoint_path = checkpoint
        extra: list[Callback] = [self.resumable, WarningsThatApply(checkpoint)]
        has_logger = (logger or config.get("logger")) not in (None, False) and not config.get(
            "barebones"
        )
        if has_logger:
            extra.append(HParamsSummary(self.searched))
        if self.subcommand == "predict":
            extra.append(PredictionWriter())
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            extra.append(StepProgressBar())
        if config.get("enable_model_summary") is not False and not any(
            isinstance(c, ModelSummary) for c in callbacks
        ):
            extra.append(RunSummary())
            kwargs["enable_model_summary"] = False  # Lightning's table: instead of it
        kwargs["callbacks"] = [*callbacks, *extra]
        self.checkpoint_io = ResumableCheckpointIO.among(_as_list(config.get("plugins")))
        if self.checkpoint is not None:
            self.checkpoint_io.preload(self.checkpoint.path, self.checkpoint.contents)
        others = [p for p in _as_list(config.get("plugins")) if not isinstance(p, CheckpointIO)]
        kwargs["plugins"] = [*others, self.checkpoint_io]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except ValueError as err:  # a strategy or accelerator this machine cannot run
            raise ConfigError(f"--trainer: {first_line(err)}") from None
        if self.subcommand == "fit":
            choose_training_loop(self.model, trainer, self.checkpoint)
        return trainer

    def _logger(self, config: dict[str, Any]) -> Logger | None:
        """The logger this run writes with, when it is not simply the configured one."""
        resumed = self.checkpoint if self.subcommand == "fit" and self._resuming_last() else None
        root = config.get("default_root_dir") or os.getcwd()
        default = config.get("logger") in (None, True) and not config.get("barebones")
        return run_logger(
            config.get("logger"), default, root, self._run_name(), self.run_dir, resumed
        )

    def __deepcopy__(self, memo: dict) -> FashionCLI:
        # the model's optimizer and scheduler (partials jsonargparse makes) reach this CLI
        # through its instantiators: a weight average's deepcopy of the model would copy the
        # Trainer and, under ddp, its launcher's processes ("cannot pickle '_thread.lock'")
        return self

    def _run_name(self) -> str | None:
        """A new run's folder is named after its config files (``sgd`` for configs/sgd.yaml)."""
        return run_name(self._section(self.config).get("config") or [])

    def _resuming_last(self) -> bool:
        return self.asked_ckpt_path == "last"

    # --- checks before running -----------------------------------------------------------

    def _check_inputs(self) -> None:
        """Turn the expected failures after parsing into one-line errors, before any work."""
        configured = isinstance(self._section(self.config).trainer.logger, Namespace)
        check_command(
            self.subcommand, self.trainer, self.model, self.datamodule, self.checkpoint, configured
        )

    def before_fit(self) -> None:
        self._check_inputs()

    def before_validate(self) -> None:
        self._check_inputs()

    def before_test(self) -> None:
        self._check_inputs()

    def before_predict(self) -> None:
        self._check_inputs()

    # --- running -------------------------------------------------------------------------

    # LightningCLI runs a method of this class in place of the Trainer's of the same name
    def fit(self, **kwargs) -> None:
        self._run(self.trainer.fit, **kwargs)

    def validate(self, **kwargs) -> None:
        self._evaluate("validate", self.trainer.validate, **kwargs)

    def test(self, **kwargs) -> None:
        self._evaluate("test", self.trainer.test, **kwargs)

    def predict(self, **kwargs) -> None:
        self._run(self.trainer.predict, **kwargs)

    def _evaluate(self, stage: str, method, verbose: bool = True, **kwargs) -> None:
        """Validate or test, and print the results as Lightning does, without ``step``."""
        results = self._run(method, verbose=False, **kwargs)
        if verbose and self.trainer.is_global_zero and results:
            print(results_table(results, stage))

    def _run(self, method, **kwargs) -> Any:
        """Run a Trainer method with the project's signal handling; a failed write (a full
        disk) becomes one line that names the file, the cause and what is kept."""
        self.resumable.listen(self.trainer.strategy.launcher, self.subcommand == "fit")
        claim_before_launch(self.trainer)
        quiet_the_resource_tracker(self.trainer)
        try:
            return method(**kwargs)
        except Exception as err:
            stopped = stop_in_processes(err, self.resumable.signal_received)
            if stopped is not None:  # the processes ddp_spawn started stopped for a signal
                end_their_progress_bar(self.trainer)
                give_back_run_folder(self.trainer, ran=self.subcommand == "fit")
                raise stopped from None
            began = self.resumable.stage_began
            restored = self.checkpoint if self._restoring() and not began else None
            failure = command_failure(err, self.trainer, self.subcommand, restored)
            ran = ran_anything(self.trainer, began, failure or err)
            if ran and not began:  # started processes ran it, and may have drawn a bar
                end_their_progress_bar(self.trainer)
            stopped = isinstance(err, Stopped)
            # a stopped fit keeps its run; a stopped evaluation has no result yet to keep
            give_back_run_folder(self.trainer, ran=self.subcommand == "fit" if stopped else ran)
            if not stopped:  # (a stop ends ddp's processes itself)
                self.resumable.stop_started_processes()
            if failure is None:
                raise
            raise failure from err
        finally:
            self.resumable.stop_listening()

    def _restoring(self) -> bool:
        """Whether the checked checkpoint went to Lightning to be restored."""
        return self.checkpoint_io is not None and self.checkpoint_io.handed_over

    def after_fit(self) -> None:
        """Evaluate the best checkpoint on the official test split, as the tutorial does."""
        if self.trainer.interrupted or not self.test_after_fit:
            return
        for callback in self.trainer.callbacks:  # one command, one config file: under
            if isinstance(callback, SaveConfigCallback):  # ddp_spawn, fit's children saved it
                callback.already_saved = True
        for logger in self.trainer.loggers:
            if isinstance(logger, RunFolderLogger):
                logger.stop_purging()
        self.resumable.trained = True  # (under ddp_spawn, fit's processes trained, not this one)
        checkpoint = run_checkpoint(self.trainer)
        best = checkpoint.best_model_path if checkpoint is not None else ""
        if best:
            # The weights are loaded here rather than by test(ckpt_path=best): during fit,
            # Lightning's WeightAveraging callbacks (EMAWeightAveraging...) put the raw training
            # weights back when a checkpoint loads, while the checkpoint holds (and was chosen
            # for) the averaged ones that a later `test --ckpt_path` measures.
            if self.trainer.is_global_zero:
                print(f"Testing the best checkpoint {best}", file=sys.stderr)
            self.model.load_state_dict(read_checkpoint(Path(best)).contents["state_dict"])
        self.test(model=self.model, datamodule=self.datamodule)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


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
    threading.excepthook = quiet_write_errors_in_threads
    if isinstance(args, list):
        args = with_packaged_configs(args)  # `--config sgd`, or configs/sgd.yaml anywhere
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
    if args is None:  # LightningCLI reads sys.argv itself (a list would be taken as a test's)
        sys.argv[1:] = with_packaged_configs(sys.argv[1:])
    try:
        run(args)
    except UserError as err:
        exit_with(err)
    except SIGTERMException:  # Lightning's own, should a SIGTERM reach it first
        exit_with(UserError("stopped by SIGTERM"), 143)
    except MisconfigurationException as err:  # Lightning refused a value of the config
        exit_with(err, 2)
    except Exception as err:
        missing = cause_of(err, ModuleNotFoundError)  # a callback's package is missing
        if missing is not None:
            exit_with(missing, 1)
        memory = out_of_memory(err)
        if memory is None:
            raise
        exit_with(memory)
