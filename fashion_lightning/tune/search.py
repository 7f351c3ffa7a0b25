"""The study, and the trials this process runs for it: each trial one real ``fit`` of the
project's CLI, in this process, with the sampled values as overrides."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from optuna.distributions import distribution_to_json
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from fashion_lightning import cli
from fashion_lightning.configs import flat, packaged_config
from fashion_lightning.errors import (
    NonFiniteLossError,
    SearchError,
    SearchStopped,
    Stopped,
    UserError,
)
from fashion_lightning.files import ensure_writable_dir, process_start
from fashion_lightning.raw_files import ensure_raw_files
from fashion_lightning.tune.space import (
    check_space,
    load_search_space,
    overrides,
    sample,
)
from fashion_lightning.tune.storage import MAX_RETRIES, alive
from fashion_lightning.tune.study import (
    OBJECTIVES,
    check_queued,
    open_study,
)
from fashion_lightning.tune.workers import STOPS

DONE = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts toward --trials
WAIT_SECONDS = 1.0  # how often a process that waits for the others' last trials looks again
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


# a journal no process wrote to for this long has no trial running on another machine
QUIET_SECONDS = 900


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
    """One study, and the trials that this process runs for it. (About 180 lines: a trial's
    fit, its stop, its retry and the wait for other processes' trials share the study.)"""

    def __init__(self, args: argparse.Namespace, fit_overrides: list[str]) -> None:
        self.config_path = Path(packaged_config(args.config))  # `best`, configs/best.yaml...
        if not self.config_path.is_file():
            raise SearchError(f"--config {self.config_path}: no such file")
        search_path = Path(packaged_config(args.search))
        self.space = load_search_space(search_path)
        config = check_space(
            self.space, self.config_path, fit_overrides, search_path, probe=not args.worker_of
        )
        if config["trainer"].get("fast_dev_run"):
            raise SearchError(
                "--trainer.fast_dev_run: a debug run records no val/acc for the search; "
                "use --trainer.limit_train_batches and --trainer.max_epochs for short trials"
            )
        self.objective = args.objective
        self.maximize = OBJECTIVES[args.objective] == "maximize"
        root = Path(config["trainer"].get("default_root_dir") or os.getcwd())
        if not args.worker_of:  # the command checked them before it started the workers
            check_fit_inputs(config, root)
        self.name = args.study
        self.folder = root / "lightning_logs" / "tune" / self.name
        self.storage_spec = args.storage or str(self.folder / "study.journal")
        self.grace = args.grace
        started = {
            "search": {key: distribution_to_json(d) for key, d in self.space.items()},
            "config": flat(config, skip=NOT_COMPARED),
            "objective": self.objective,
        }
        quiet = self._journal_quiet()  # before this process writes to it
        self.study = open_study(args, self.folder, self.storage_spec, started)
        # The trials that were running when the journal had been quiet for a quarter of an
        # hour: another machine's, in a study handed over or left behind. Not running now.
        self.quiet_trials = {
            trial.number
            for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if quiet
        }
        check_queued(self.study, self.space, self.storage_spec)
        self.trials = args.trials
        self.fit_overrides = fit_overrides

    def fail_lost_trials(self) -> None:
        """Fail the running trials whose process or machine is gone, and queue their
        parameters again: those whose heartbeats stopped (RDB storages, Optuna's own check)
        and those of dead processes on this machine (:meth:`fail_dead_trials`)."""
        with STOPS.deferring():
            optuna.storages.fail_stale_trials(self.study)
            self.fail_dead_trials()

    def fail_dead_trials(self) -> None:
        """Fail the running trials whose process on this machine is gone (a ``kill -9``, a
        crash), and try their parameters again. Optuna's journal file keeps no heartbeat, so
        such a trial would otherwise stay RUNNING forever. So would one whose process died
        before it ran (Optuna had created it, and no heartbeat yet): after ``--grace``."""
        host = socket.gethostname()
        with STOPS.deferring():
            for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                attrs = trial.user_attrs
                if _own_process_recorded(trial) and attrs.get("host") != host:
                    if trial.number not in self.quiet_trials and not self._journal_quiet():
                        continue
                    reason = f"its machine has not written to the study for {QUIET_SECONDS} s"
                elif _own_process_recorded(trial):
                    if alive(attrs["pid"], attrs.get("process_start")):
                        continue
                    reason = "its process died"
                elif _seconds_since_start(trial) > self.grace:
                    reason = "its process died before it began"
                else:
                    continue
                try:
                    self.study.tell(trial.number, state=TrialState.FAIL)
                except (ValueError, RuntimeError):
                    continue  # another worker got there first
                self.retry(trial, reason)

    def _journal_quiet(self) -> bool:
        """Whether the study is a journal file (no heartbeats) that no process has written to
        for ``QUIET_SECONDS``: a trial of another machine is then not running any more (its
        fit writes each epoch's value; a study someone hands over holds such trials)."""
        journal = Path(self.storage_spec)
        if "://" in self.storage_spec or not journal.is_file():
            return False
        return time.time() - journal.stat().st_mtime > QUIET_SECONDS

    def retry(self, trial: FrozenTrial | optuna.Trial, reason: str) -> None:
        """Queue the parameters of a trial that did not finish, up to MAX_RETRIES times."""
        retries = trial.user_attrs.get("retries", 0)
        if retries < MAX_RETRIES:
            with STOPS.deferring():
                self.study.enqueue_trial(
                    trial.params, user_attrs={"retry_of": trial.number, "retries": retries + 1}
                )
            print(
                f"trial {trial.number}: {reason}; its parameters will be tried again",
                file=sys.stderr,
            )

    def run_trial(self, trial: optuna.Trial) -> float:
        """Optuna's objective: one ``fit`` with the sampled values; its best objective value.
        A stop (a signal, Lightning's own exit) fails the trial and queues its parameters
        again; only the fit command line's refusal (exit 2, no signal) is a refused fit."""
        try:
            return self._fit(trial)
        except NonFiniteLossError as err:  # diverged: as bad as it gets, and finished
            raise optuna.TrialPruned(str(err)) from None
        except (Stopped, SIGTERMException, KeyboardInterrupt) as err:
            raise self._stopped(trial, err) from None
        except SystemExit as exit_:
            if exit_.code != 2 or STOPS.signum is not None:  # Lightning's own stop: exit 1
                raise self._stopped(trial, exit_) from None
            raise SearchError(  # the fit command line refused the sampled values
                f"trial {trial.number}: fit refused {' '.join(overrides(trial.params))} (the "
                "error above); narrow the search file's ranges"
            ) from None

    def _fit(self, trial: optuna.Trial) -> float:
        """The trial's fit. A signal stops it at once while the fit runs (the fit takes the
        signals over once it trains); around it, the trial is written to the study, which a
        signal does not cut short: it waits until the fit begins."""
        STOPS.check()  # a signal that came while Optuna created this trial
        run_dir = (self.folder / f"trial_{trial.number}").absolute()
        # who runs the trial, so that a dead process's trial is told (run_dir last: with it,
        # the others are this trial's own, not copied from the trial it retries)
        for key, value in (
            ("host", socket.gethostname()),
            ("pid", os.getpid()),
            ("process_start", process_start(os.getpid())),
            ("run_dir", str(run_dir)),
        ):
            trial.set_user_attr(key, value)
        params = {key: sample(trial, key, d) for key, d in self.space.items()}
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
            with STOPS.raising():
                cli.run(
                    args,
                    run_dir=run_dir,
                    callbacks=[best, pruning],
                    test_after_fit=False,
                    searched=params,
                )
        finally:
            trial.set_user_attr("seconds", round(time.monotonic() - start, 1))
        if best.best is None:
            raise UserError(f"trial {trial.number} recorded no {self.objective}")
        # the complete config, in the study: the best one is written from here, on any machine
        trial.set_user_attr("config", (run_dir / "config.yaml").read_text())
        return best.best

    def _stopped(self, trial: optuna.Trial, err: BaseException) -> SearchStopped:
        stopped = _search_stopped(trial, err)
        STOPS.note(stopped.signum)  # from now on, a signal waits until the stop is recorded
        self.retry(trial, "it was stopped")
        return stopped

    def work(self) -> None:
        """Run trials, one at a time, until the study holds ``--trials`` finished (complete or
        pruned) ones. Before each trial, and while waiting, the trials of dead processes and
        machines are failed and their parameters queued; queued parameters run before new
        ones. When the trials that would reach the total run elsewhere, wait for them: should
        one's process or machine die, this process runs its parameters again."""
        waiting = False
        with STOPS.deferring():
            while True:
                STOPS.check()
                self.fail_lost_trials()
                done, running = self._counts()
                if done >= self.trials:
                    return
                if done + running >= self.trials:
                    if not waiting:
                        print(f"waiting for {running} running trial(s) to finish", file=sys.stderr)
                    waiting = True
                    STOPS.sleep(WAIT_SECONDS)
                    continue
                waiting = False
                self.study.optimize(self.run_trial, n_trials=1)

    def _counts(self) -> tuple[int, int]:
        """The study's finished trials (what counts toward ``--trials``) and running ones."""
        trials = self.study.get_trials(deepcopy=False, states=(*DONE, TrialState.RUNNING))
        running = sum(t.state == TrialState.RUNNING for t in trials)
        return len(trials) - running, running


def _own_process_recorded(trial: FrozenTrial) -> bool:
    """Whether the trial records the process that runs it (not one copied from the trial it
    retries, or none yet)."""
    run_dir = trial.user_attrs.get("run_dir")
    return run_dir is not None and Path(run_dir).name == f"trial_{trial.number}"


def _seconds_since_start(trial: FrozenTrial) -> float:
    start = trial.datetime_start
    if start is None:
        return 0.0
    return (datetime.datetime.now(start.tzinfo) - start).total_seconds()


def check_fit_inputs(config: dict[str, Any], root: Path) -> None:
    """What would fail every trial's fit, checked once before the study is opened: the data
    set (found, verified, unpacked as the fit would) and a writable root folder."""
    data = config["data"]
    ensure_raw_files(data["data_dir"], data["source_dir"], data["download"])
    try:
        ensure_writable_dir(root)
    except OSError as err:
        raise UserError(
            f"cannot write the search's runs to {root} ({err.strerror or err}); pass a "
            "writable --trainer.default_root_dir"
        ) from None


def _search_stopped(trial: optuna.Trial, err: BaseException) -> SearchStopped:
    signum = getattr(err, "signum", None)
    if signum is None:
        signum = signal.SIGTERM if isinstance(err, SIGTERMException) else signal.SIGINT
    stopped = getattr(err, "stopped", None) or f"stopped by {signal.Signals(signum).name}"
    return SearchStopped(
        signum, f"trial {trial.number} {stopped}; the same command continues the study"
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
