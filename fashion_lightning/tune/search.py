"""The study, and the trials this process runs for it: each trial one real ``fit`` of the
project's CLI, in this process, with the sampled values as overrides."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from fashion_lightning import cli
from fashion_lightning.configs import flat
from fashion_lightning.errors import (
    NonFiniteLossError,
    SearchError,
    SearchStopped,
    Stopped,
    UserError,
    first_line,
)
from fashion_lightning.tune.space import check_space, load_search_space, overrides, sample
from fashion_lightning.tune.storage import MAX_RETRIES, alive, open_storage, process_start, shown

# the objectives a study can have, and which way is better
OBJECTIVES = {"val/acc": "maximize", "val/loss": "minimize"}
DONE = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts toward --trials
# config keys that may differ between the machines or runs of one study: where files are,
# the hardware, and what is shown; not what is trained
NOT_COMPARED = (
    "ckpt_path",
    "data.data_dir",
    "data.source_dir",
    "data.download",
    "data.predict_dir",
    "data.num_workers",
    "data.data_on_device",
    "data.eval_batch_size",
    "trainer.default_root_dir",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.logger",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.num_sanity_val_steps",
    "trainer.profiler",
    "images",
    "checkpoint.dirpath",
    "checkpoint.verbose",
)


class BestValue(Callback):
    """The best value of a validation metric over a trial's epochs: the trial's result, whatever
    the run's checkpoint monitors."""

    def __init__(self, metric: str, maximize: bool) -> None:
        self.metric, self.maximize = metric, maximize
        self.best: float | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        value = float(value)
        if self.best is None or (value > self.best if self.maximize else value < self.best):
            self.best = value


class Search:
    """One study, and the trials that this process runs for it."""

    def __init__(self, args: argparse.Namespace, fit_overrides: list[str]) -> None:
        self.config_path = Path(args.config)
        if not self.config_path.is_file():
            raise SearchError(f"--config {self.config_path}: no such file")
        search_path = Path(args.search)
        self.space = load_search_space(search_path)
        config = check_space(self.space, self.config_path, fit_overrides, search_path)
        if config["trainer"].get("fast_dev_run"):
            raise SearchError(
                "--trainer.fast_dev_run: a debug run records no val/acc for the search; "
                "use --trainer.limit_train_batches and --trainer.max_epochs for short trials"
            )
        self.objective = args.objective
        self.maximize = OBJECTIVES[args.objective] == "maximize"
        root = Path(config["trainer"].get("default_root_dir") or os.getcwd())
        self.name = args.study
        self.folder = root / "lightning_logs" / "tune" / self.name
        self.storage_spec = args.storage or str(self.folder / "study.journal")
        self.study = _open_study(args, self.folder / "study.journal", self.storage_spec)
        self.study.set_metric_names([self.objective])  # what optuna-dashboard calls it
        started = {
            "search": {key: distribution_to_json(d) for key, d in self.space.items()},
            "config": flat(config, skip=NOT_COMPARED),
            "objective": self.objective,
        }
        check_same_study(self.study, self.storage_spec, started)
        check_trial_folders(self.study, self.storage_spec, self.folder)
        self.trials = args.trials
        self.fit_overrides = fit_overrides

    def fail_dead_trials(self) -> None:
        """Fail the running trials whose process on this machine is gone (a ``kill -9``, a
        crash), and try their parameters again. Optuna's journal file keeps no heartbeat, so
        such a trial would otherwise stay RUNNING forever."""
        host = socket.gethostname()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = trial.user_attrs
            if attrs.get("host") != host or "pid" not in attrs:
                continue
            if alive(attrs["pid"], attrs.get("process_start")):
                continue
            try:
                self.study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError):
                continue  # another worker got there first
            self.retry(trial, "its process died")

    def retry(self, trial: FrozenTrial | optuna.Trial, reason: str) -> None:
        retries = trial.user_attrs.get("retries", 0)
        if retries < MAX_RETRIES:
            self.study.enqueue_trial(
                trial.params, user_attrs={"retry_of": trial.number, "retries": retries + 1}
            )
            print(
                f"trial {trial.number}: {reason}; its parameters will be tried again",
                file=sys.stderr,
            )

    def run_trial(self, trial: optuna.Trial) -> float:
        """Optuna's objective: one ``fit`` with the sampled values; its best objective value."""
        params = {key: sample(trial, key, d) for key, d in self.space.items()}
        run_dir = (self.folder / f"trial_{trial.number}").absolute()
        for key, value in (
            ("host", socket.gethostname()),
            ("pid", os.getpid()),
            ("process_start", process_start(os.getpid())),
            ("run_dir", str(run_dir)),
        ):
            trial.set_user_attr(key, value)
        try:
            run_dir.mkdir(parents=True)  # the claim: no two trials, of any study, share one
        except FileExistsError:
            raise SearchError(
                f"{run_dir} exists already: another study of this name logs here; start "
                "another with --study NAME, or move that folder away"
            ) from None
        args = ["fit", "--config", str(self.config_path), *self.fit_overrides, *overrides(params)]
        print(f"trial {trial.number}: {' '.join(overrides(params))} -> {run_dir}", file=sys.stderr)
        best = BestValue(self.objective, self.maximize)
        pruning = PyTorchLightningPruningCallback(trial, monitor=self.objective)
        start = time.monotonic()
        try:
            cli.run(
                args,
                run_dir=run_dir,
                callbacks=[best, pruning],
                test_after_fit=False,
                searched=params,
            )
        except NonFiniteLossError as err:  # diverged: as bad as it gets, and finished
            raise optuna.TrialPruned(str(err)) from None
        except (Stopped, SIGTERMException, KeyboardInterrupt) as err:
            self.retry(trial, "it was stopped")
            raise _search_stopped(trial, err) from None
        except SystemExit as exit_:
            if exit_.code != 2:  # Lightning's own stop (a second Ctrl+C): exit 1
                self.retry(trial, "it was stopped")
                raise _search_stopped(trial, exit_) from None
            raise SearchError(  # the fit command line refused the sampled values
                f"trial {trial.number}: fit refused {' '.join(overrides(params))} (the "
                "error above); narrow the search file's ranges"
            ) from None
        finally:
            trial.set_user_attr("seconds", round(time.monotonic() - start, 1))
        if best.best is None:
            raise UserError(f"trial {trial.number} recorded no {self.objective}")
        # the complete config, in the study: the best one is written from here, on any machine
        trial.set_user_attr("config", (run_dir / "config.yaml").read_text())
        return best.best

    def work(self) -> None:
        """Run trials until the study holds ``--trials`` finished ones. Trials running in other
        workers count too, so that parallel workers do not overshoot; the parameters of a trial
        that failed (stopped, or its worker died) are tried again before new ones."""
        self.fail_dead_trials()
        counted = (*DONE, TrialState.RUNNING)
        if len(self.study.get_trials(deepcopy=False, states=counted)) >= self.trials:
            return
        self.study.optimize(
            self.run_trial,
            callbacks=[
                lambda study, trial: self.fail_dead_trials(),
                optuna.study.MaxTrialsCallback(self.trials, states=counted),
            ],
        )


def _search_stopped(trial: optuna.Trial, err: BaseException) -> SearchStopped:
    import signal

    signum = getattr(err, "signum", None)
    if signum is None:
        signum = signal.SIGTERM if isinstance(err, SIGTERMException) else signal.SIGINT
    stopped = getattr(err, "stopped", None) or f"stopped by {signal.Signals(signum).name}"
    return SearchStopped(
        signum, f"trial {trial.number} {stopped}; the same command continues the study"
    )


def _open_study(args: argparse.Namespace, journal: Path, storage_spec: str) -> optuna.Study:
    storage = open_storage(args.storage, journal)
    pruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=args.startup_trials, n_warmup_steps=args.warmup_epochs
        )
        if args.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    sampler = optuna.samplers.TPESampler(
        n_startup_trials=args.startup_trials, multivariate=True, constant_liar=True
    )
    try:
        return optuna.create_study(
            study_name=args.study,
            storage=storage,
            direction=OBJECTIVES[args.objective],
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except Exception as err:
        raise UserError(
            f"--storage {shown(storage_spec)}: cannot use the study ({first_line(err)})"
        ) from None


def check_same_study(study: optuna.Study, storage_spec: str, started: dict[str, Any]) -> None:
    """A study continues only with the config, search and objective it started with: trials
    of another config or space would be ranked together (and Optuna refuses a changed
    distribution). Machine-specific paths may differ (several machines, own folders)."""
    recorded = study.user_attrs.get("started_with")
    if recorded is None:
        study.set_user_attr("started_with", started)
        return
    parts = {"search": "search file", "config": "config", "objective": "objective"}
    for part, now in started.items():
        then = recorded.get(part, {} if part != "objective" else "val/acc")
        if part == "objective":
            then, now = {"objective": then}, {"objective": now}
        changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
        if changed:
            key = changed[0]
            more = f", and {len(changed) - 1} more" if len(changed) > 1 else ""
            raise SearchError(
                f"study {study.study_name} in {shown(storage_spec)} was started with another "
                f"{parts[part]} ({key}: {_as_written(then.get(key, 'absent'))} then, "
                f"{_as_written(now.get(key, 'absent'))} now{more}); continue it with the same "
                "arguments, or start another with --study NAME"
            )


def _as_written(value: Any) -> str:
    """A search file's distribution as a user writes it (``low..high``), other values as they are."""
    if isinstance(value, str) and value.startswith("{"):
        try:
            distribution: BaseDistribution = optuna.distributions.json_to_distribution(value)
        except (ValueError, KeyError):
            return value
        choices = getattr(distribution, "choices", None)
        if choices is not None:
            return "[" + ", ".join(str(c) for c in choices) + "]"
        scale = " log" if getattr(distribution, "log", False) else ""
        return f"{distribution.low}..{distribution.high}{scale}"
    return str(value)


def check_trial_folders(study: optuna.Study, storage_spec: str, folder: Path) -> None:
    """Every trial_N folder here belongs to a trial of this study: a study started anew
    (another storage, a deleted journal) would otherwise log into an old trial's folder."""
    known = {
        t.number
        for t in study.get_trials(deepcopy=False)
        if Path(t.user_attrs.get("run_dir", "")).resolve()
        == (folder / f"trial_{t.number}").resolve()
    }
    strangers = sorted(
        p.name
        for p in folder.glob("trial_*")
        if not p.name.removeprefix("trial_").isdigit()
        or int(p.name.removeprefix("trial_")) not in known
    )
    if strangers:
        raise SearchError(
            f"{folder} holds {', '.join(strangers[:3])}{' ...' if len(strangers) > 3 else ''}, "
            f"which the study {study.study_name} in {shown(storage_spec)} does not know "
            "(another study of this name, or its storage was replaced): start another with "
            "--study NAME, or move that folder away"
        )


def no_traceback_for_known_errors() -> None:
    """Optuna logs a failed trial with its traceback; for a stop or an error this command
    explains in one line, the line is enough."""

    def shorten(record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, UserError):
            record.exc_info = None
            record.msg = str(record.msg).split(" because of the following error")[0]
        return not str(record.msg).endswith("failed with value None.")  # it says no more

    logging.getLogger("optuna.study._optimize").addFilter(shorten)
