"""``python -m fashion_lightning.tune``: a hyperparameter search over ``fit`` runs, on Optuna.

    python -m fashion_lightning.tune --config configs/best.yaml \\
        --search configs/search/mlp.yaml --trials 40

Each trial is a real ``fit`` of the project's CLI with the sampled values as overrides, in its
own run folder ``lightning_logs/tune/<study>/trial_N/`` (so TensorBoard's HParams tab compares
the trials, and each trial's ``config.yaml`` reproduces it). The objective is the best
``val/acc``; the official test split is read only by ``--confirm_seeds``. Trials that fall
behind are pruned (Optuna's MedianPruner through optuna-integration's Lightning callback).
The study lives in a journal file next to the trials, or in any Optuna storage URL
(PostgreSQL for several machines); running the same command again continues it.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

try:
    import optuna
except ModuleNotFoundError:  # an optional part of the package
    sys.exit("error: the search needs Optuna: pip install 'fashion-lightning[tune]' (make does)")
from optuna.distributions import distribution_to_json
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from fashion_lightning import cli
from fashion_lightning.errors import NonFiniteLossError, TrainingInterrupted, UserError
from fashion_lightning.search_space import (
    SearchError,
    check_space,
    config_text,
    load_search_space,
    overrides,
    sample,
)
from fashion_lightning.study_storage import (
    MAX_RETRIES,
    alive,
    first_line,
    open_storage,
    process_start,
    shown,
)

PROG = "python -m fashion_lightning.tune"
OBJECTIVE = "val/acc"
# what may follow the search's own flags: the fit command line's groups
FIT_ARGUMENTS = (
    "--trainer.",
    "--model.",
    "--data.",
    "--checkpoint.",
    "--images.",
    "--seed_everything",
)
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


class SearchStopped(Exception):
    """SIGINT or SIGTERM reached the search outside a trial's training."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with its error as one line like the fit command's (not usage, then the error)."""

    def error(self, message: str):
        print(f"error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the fit config the trials start from")
    parser.add_argument("--search", required=True, help="YAML: dotted config key -> distribution")
    parser.add_argument(
        "--trials", type=whole_number(1), required=True, help="total the study should reach"
    )
    parser.add_argument(
        "--study", type=study_name, help="study name (default: the config file's name)"
    )
    parser.add_argument(
        "--storage",
        help="a journal file path, or an Optuna storage URL such as postgresql://user@host/db "
        "(default: lightning_logs/tune/<study>/study.journal)",
    )
    parser.add_argument("--workers", type=whole_number(1), default=1, help="worker processes here")
    parser.add_argument(
        "--confirm_seeds",
        type=whole_number(0),
        default=0,
        help="retrain the best config with this many seeds and report its test accuracy",
    )
    parser.add_argument(
        "--pruner",
        choices=("median", "none"),
        default="median",
        help="stop trials that fall behind",
    )
    parser.add_argument(
        "--warmup_epochs",
        type=whole_number(0),
        default=5,
        help="epochs a trial trains before it can be pruned (early epochs tell little)",
    )
    parser.add_argument(
        "--startup_trials",
        type=whole_number(0),
        default=5,
        help="trials sampled at random and never pruned, before TPE and pruning start",
    )
    parser.add_argument("--worker_of", type=int, default=0, help=argparse.SUPPRESS)
    args, fit_overrides = parser.parse_known_args(argv)
    unknown = [a for a in fit_overrides if a.startswith("-") and not a.startswith(FIT_ARGUMENTS)]
    if unknown:
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)} (beyond its own flags, the search takes "
            "the fit command line's --trainer.*, --model.*, --data.* ...)"
        )
    return args, fit_overrides


def whole_number(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def study_name(text: str) -> str:
    """A study's name is also its folder's name under lightning_logs/tune/."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use letters, digits, '.', '_' and '-' (it names a folder), e.g. mlp-wide"
        )
    return text


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
        root = Path(config["trainer"].get("default_root_dir") or os.getcwd())
        self.name = args.study or self.config_path.stem
        if args.study is None:
            try:
                study_name(self.name)
            except argparse.ArgumentTypeError:
                raise SearchError(
                    f"--config {self.config_path}: its file name cannot name the study (it "
                    "names a folder); pass --study NAME"
                ) from None
        self.folder = root / "lightning_logs" / "tune" / self.name
        self.storage_spec = args.storage or str(self.folder / "study.journal")
        storage = open_storage(args.storage, self.folder / "study.journal")
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
            self.study = optuna.create_study(
                study_name=self.name,
                storage=storage,
                direction="maximize",
                sampler=sampler,
                pruner=pruner,
                load_if_exists=True,
            )
        except Exception as err:
            raise UserError(
                f"--storage {shown(self.storage_spec)}: cannot use the study ({first_line(err)})"
            ) from None
        self.study.set_metric_names([OBJECTIVE])  # what optuna-dashboard calls the objective
        self.check_same_study(config)
        self.check_trial_folders()
        self.trials = args.trials
        self.fit_overrides = fit_overrides

    def check_same_study(self, config: dict) -> None:
        """A study continues only with the config and search it started with: trials of another
        config or space would be ranked together (and Optuna refuses a changed distribution).
        Machine-specific paths may differ (several machines, each with its own folders)."""
        started = {
            "search": {key: distribution_to_json(d) for key, d in self.space.items()},
            "config": _flat(config, skip=NOT_COMPARED),
        }
        recorded = self.study.user_attrs.get("started_with")
        if recorded is None:
            self.study.set_user_attr("started_with", started)
            return
        for part, now in started.items():
            then = recorded.get(part, {})
            changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
            if changed:
                key = changed[0]
                raise SearchError(
                    f"study {self.name} in {shown(self.storage_spec)} was started with another "
                    f"{'search file' if part == 'search' else 'config'} ({key}: "
                    f"{then.get(key, 'absent')} then, {now.get(key, 'absent')} now"
                    f"{f', and {len(changed) - 1} more' if len(changed) > 1 else ''}); continue "
                    "it with the same arguments, or start another with --study NAME"
                )

    def check_trial_folders(self) -> None:
        """Every trial_N folder here belongs to a trial of this study: a study started anew
        (another storage, a deleted journal) would otherwise log into an old trial's folder."""
        known = {
            t.number
            for t in self.study.get_trials(deepcopy=False)
            if Path(t.user_attrs.get("run_dir", "")).resolve()
            == (self.folder / f"trial_{t.number}").resolve()
        }
        strangers = sorted(
            p.name
            for p in self.folder.glob("trial_*")
            if not p.name.removeprefix("trial_").isdigit()
            or int(p.name.removeprefix("trial_")) not in known
        )
        if strangers:
            raise SearchError(
                f"{self.folder} holds {', '.join(strangers[:3])}{' ...' if len(strangers) > 3 else ''}, "
                f"which the study {self.name} in {shown(self.storage_spec)} does not know (another "
                "study of this name, or its storage was replaced): start another with --study "
                "NAME, or move that folder away"
            )

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

    def objective(self, trial: optuna.Trial) -> float:
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
        start = time.monotonic()
        try:
            fit = cli.run(
                args,
                run_dir=run_dir,
                callbacks=[PyTorchLightningPruningCallback(trial, monitor=OBJECTIVE)],
                test_after_fit=False,
                searched=params,
            )
        except NonFiniteLossError as err:  # diverged: as bad as it gets, and finished
            raise optuna.TrialPruned(str(err)) from None
        except TrainingInterrupted as err:
            self.retry(trial, "it was stopped")
            raise SearchStopped(
                err.exit_code - 128,
                f"trial {trial.number} {err.stopped}; the same command continues the study",
            ) from None
        except SearchStopped:
            self.retry(trial, "it was stopped")
            raise
        except SystemExit:  # the fit command line refused the sampled values
            raise SearchError(
                f"trial {trial.number}: fit refused {' '.join(overrides(params))} (the "
                "error above); narrow the search file's ranges"
            ) from None
        finally:
            trial.set_user_attr("seconds", round(time.monotonic() - start, 1))
        checkpoint = fit.trainer.checkpoint_callback
        if checkpoint is None or checkpoint.best_model_score is None:
            raise UserError(f"trial {trial.number} recorded no {OBJECTIVE}")
        # the complete config, in the study: the best one is written from here, on any machine
        trial.set_user_attr("config", (run_dir / "config.yaml").read_text())
        return float(checkpoint.best_model_score)

    def work(self) -> None:
        """Run trials until the study holds ``--trials`` finished ones. Trials running in other
        workers count too, so that parallel workers do not overshoot; the parameters of a trial
        that failed (stopped, or its worker died) are tried again before new ones."""
        self.fail_dead_trials()
        counted = (*DONE, TrialState.RUNNING)
        if len(self.study.get_trials(deepcopy=False, states=counted)) >= self.trials:
            return
        self.study.optimize(
            self.objective,
            callbacks=[
                lambda study, trial: self.fail_dead_trials(),
                optuna.study.MaxTrialsCallback(self.trials, states=counted),
            ],
        )

    def summary(self) -> Path:
        """Print the best trials, draw Optuna's plots, write the best trial's config."""
        trials = self.study.get_trials(deepcopy=False)
        counts = {state: sum(t.state == state for t in trials) for state in TrialState}
        minutes = sum(t.user_attrs.get("seconds", 0) for t in trials) / 60
        print(
            f"study {self.name} ({shown(self.storage_spec)}): {len(trials)} trials, "
            f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
            f"{counts[TrialState.FAIL]} failed, {minutes:.1f} min of training"
        )
        finished = sorted(
            (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value
        )
        if not finished:
            raise UserError(
                f"study {self.name}: no trial completed ({counts[TrialState.PRUNED]} pruned, "
                f"{counts[TrialState.FAIL]} failed), so there is no best config; search more "
                "with a higher --trials, or --pruner none"
            )
        keys = list(self.space)
        print(" | ".join(["trial", OBJECTIVE, "epochs", "seconds", *keys]))
        for trial in finished[:10]:
            cells = [
                str(trial.number),
                f"{trial.value:.4f}",
                str(len(trial.intermediate_values)),
                str(trial.user_attrs.get("seconds", "")),
                *(_short(trial.params.get(key)) for key in keys),
            ]
            print(" | ".join(cells))
        self.plot()
        return self.write_best(finished[0])

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        from optuna.visualization import matplotlib as plots

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            for name, draw in (
                ("history", plots.plot_optimization_history),
                ("importances", plots.plot_param_importances),
            ):
                try:
                    axes = draw(self.study)
                except (ValueError, RuntimeError, TypeError) as err:  # e.g. 1 finished trial
                    print(f"no {name} plot yet: {err}", file=sys.stderr)
                    continue
                path = self.folder / f"{name}.png"
                axes.figure.savefig(path, dpi=110, bbox_inches="tight")
                matplotlib.pyplot.close(axes.figure)
                print(f"plot: {path}")

    def write_best(self, best: FrozenTrial) -> Path:
        """The best trial's complete config, runnable as ``fit --config`` as it is."""
        text = best.user_attrs.get("config")
        if text is None:  # a trial of an earlier version, which kept it only in its folder
            text = (Path(best.user_attrs["run_dir"]) / "config.yaml").read_text()
        config = yaml.safe_load(text)
        config["ckpt_path"] = None
        path = self.folder / "best.yaml"
        if path.resolve() == self.config_path.resolve():
            raise SearchError(
                f"--config {self.config_path} is where this study writes its best config: "
                "copy it elsewhere, or start another study with --study NAME"
            )
        curve = best.intermediate_values  # val/acc after each epoch
        epoch = max(curve, key=curve.get) + 1 if curve else "?"
        header = (
            f"# Best trial of the search '{self.name}': trial {best.number}, "
            f"{OBJECTIVE} {best.value:.4f} at epoch {epoch} of {len(curve)}.\n"
            f"# Sampled: {' '.join(overrides(best.params))}\n"
            f"#   python -m fashion_lightning fit --config {shlex.quote(str(path))}\n"
        )
        path.write_text(header + yaml.safe_dump(config, sort_keys=False))
        return path

    def confirm(self, best_config: Path, seeds: int) -> None:
        """Retrain the best config with several seeds and report the official test accuracy:
        the only step of the search that reads the test split."""
        accuracies = []
        for seed in range(42, 42 + seeds):
            run_dir, again = self.folder / f"confirm_seed_{seed}", 1
            while run_dir.exists():  # confirmed before: keep that run, and its numbers
                again += 1
                run_dir = self.folder / f"confirm_seed_{seed}_{again}"
            args = [
                "fit",
                "--config",
                str(best_config),
                f"--seed_everything={seed}",
                f"--data.seed={seed}",
            ]
            fit = cli.run(args, run_dir=run_dir)
            accuracy = float(fit.trainer.callback_metrics["test/acc"]) * 100
            accuracies.append(accuracy)
            print(f"confirm seed {seed}: test/acc {accuracy:.2f}% -> {run_dir}")
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        print(
            f"test accuracy of {best_config} over {seeds} seeds: "
            f"{statistics.mean(accuracies):.2f} ± {spread:.2f}% "
            f"({', '.join(f'{a:.2f}' for a in accuracies)})"
        )


def _flat(config: Any, skip: tuple[str, ...] = (), prefix: str = "") -> dict[str, Any]:
    """``{"model.dropout": 0.1, ...}``: a config's leaves under their dotted keys."""
    if prefix.rstrip(".") in skip:
        return {}
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    flat = {}
    for key, value in config.items():
        flat.update(_flat(value, skip, f"{prefix}{key}."))
    return flat


def _short(value: Any) -> str:
    """A value as the config writes it (null, true), fractions to 4 digits."""
    return f"{value:.4g}" if isinstance(value, float) else config_text(value)


def _no_traceback_for_known_errors(record: logging.LogRecord) -> bool:
    """Optuna logs a failed trial with its traceback; for a stop or an error this command
    explains in one line, the line is enough."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, (UserError, SearchStopped)):
        record.exc_info = None
        record.msg = str(record.msg).split(" because of the following error")[0]
    return not str(record.msg).endswith("failed with value None.")  # it says no more


def _stop_on_signals() -> None:
    """SIGINT/SIGTERM between trials stop the search at once (during a trial's training the
    trial's own handler saves its checkpoint first)."""

    def stop(signum, frame):
        raise SearchStopped(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


def _stop_when_parent_dies() -> None:
    """A worker gets SIGTERM when the command that started it dies, even by ``kill -9``: its
    trial stops with its checkpoint and is tried again later, rather than the search going on
    unseen. Linux's ``prctl(PR_SET_PDEATHSIG)``, which Python's library does not offer."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker finishes its trials
        return
    if os.getppid() == 1:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def _run_workers(argv: list[str], workers: int) -> int:
    """Start ``workers`` processes on the study; pass signals on; the first failure's code."""
    command = [sys.executable, "-m", "fashion_lightning.tune", *argv, "--worker_of", str(workers)]
    processes = [subprocess.Popen(command) for _ in range(workers)]

    def forward(signum, frame):
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    codes = [process.wait() for process in processes]
    for process in processes:
        if process.returncode < 0:  # killed (kill -9, out of memory): others go on
            name = signal.Signals(-process.returncode).name
            print(f"worker {process.pid} was killed by {name}", file=sys.stderr)
    failed = [code for code in codes if code > 0]
    return failed[0] if failed else 0


def main_tune(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sys.argv[0] = "python -m fashion_lightning"  # the fit command's messages name it so
    # heartbeats and the matplotlib plots are marked experimental in Optuna 5
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # the trials run the fit command line in this process on purpose (one CLI, one parser)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    logging.getLogger("optuna.study._optimize").addFilter(_no_traceback_for_known_errors)
    args, fit_overrides = parse_args(argv)
    _stop_on_signals()
    search = Search(args, fit_overrides)
    if args.worker_of:  # one of --workers processes: share the machine's cores
        _stop_when_parent_dies()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.worker_of))
        search.work()
        return
    if args.workers > 1:
        search.fail_dead_trials()
        code = _run_workers(argv, args.workers)
        if code:
            raise SystemExit(code)
    search.work()  # with workers: what a killed one left undone
    best = search.summary()
    if args.confirm_seeds > 0:
        search.confirm(best, args.confirm_seeds)
    print(f"optuna-dashboard {shlex.quote(shown(search.storage_spec))}    # to watch the study")
    print(f"best config: {best}")


def main(argv: list[str] | None = None) -> None:
    """``python -m fashion_lightning.tune``: one-line errors and signal exit codes, as ``fit``."""
    try:
        main_tune(argv)
    except (UserError, SearchStopped) as err:
        if os.environ.get(cli.DEBUG_ENV):
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    main()
