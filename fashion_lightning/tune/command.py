"""The search's command line, and how it ends: one-line errors and the exit codes of ``fit``."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import warnings

import torch

try:
    import optuna
except ModuleNotFoundError:  # an optional part of the package
    sys.exit("error: the search needs Optuna: pip install 'fashion-lightning[tune]' (make does)")

from fashion_lightning.errors import OneLineErrorParser, SearchError, UserError, exit_with
from fashion_lightning.tune import report
from fashion_lightning.tune.search import Search, no_traceback_for_known_errors
from fashion_lightning.tune.storage import (
    GRACE_HEARTBEATS,
    HEARTBEAT_SECONDS,
    check_url,
    is_url,
    shown,
)
from fashion_lightning.tune.study import OBJECTIVES
from fashion_lightning.tune.workers import STOPS, run_workers, stop_when_parent_dies

PROG = "python -m fashion_lightning.tune"
# what may follow the search's own flags: the fit command line's groups
FIT_ARGUMENTS = (
    "--trainer.",
    "--model.",
    "--data.",
    "--checkpoint.",
    "--images.",
    "--seed_everything",
)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The search's own flags, checked, and the fit command line's arguments that follow."""
    installed = os.path.basename(sys.argv[0]) == "fashion-lightning-tune"
    parser = OneLineErrorParser(
        prog="fashion-lightning-tune" if installed else PROG,
        description=__doc__.split("\n\n")[0],
        epilog="Beyond these flags, the fit command line's --trainer.*, --model.*, --data.*, "
        "--checkpoint.*, --images.* and --seed_everything go to every trial, over --config "
        "and under the sampled values (e.g. --trainer.max_epochs 20 --data.num_workers 0); "
        "see docs/search.md.",
    )
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
    parser.add_argument(
        "--objective",
        choices=tuple(OBJECTIVES),
        default="val/acc",
        help="what a trial is ranked by: its best val/acc (higher is better, the default) or "
        "its best val/loss (lower is better), whatever the checkpoint monitors",
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
    parser.add_argument(
        "--heartbeat",
        type=whole_number(1),
        help="with an RDB storage (postgresql://...): seconds between a running trial's "
        f"heartbeats (default {HEARTBEAT_SECONDS})",
    )
    parser.add_argument(
        "--grace",
        type=whole_number(1),
        help="with an RDB storage: seconds without a heartbeat after which a trial's machine "
        "counts as dead, and its trial is failed and tried again (default "
        f"{GRACE_HEARTBEATS} heartbeats)",
    )
    parser.add_argument("--worker_of", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--parent_pid", type=int, default=0, help=argparse.SUPPRESS)
    args, fit_overrides = parser.parse_known_args(argv)
    unknown = [a for a in fit_overrides if a.startswith("-") and not a.startswith(FIT_ARGUMENTS)]
    if unknown:
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)} (beyond its own flags, the search takes "
            "the fit command line's --trainer.*, --model.*, --data.* ...)"
        )
    check_heartbeat(args)
    if is_url(args.storage):
        check_url(args.storage)  # before anything could print or pass on its password
    if args.study is None:
        name = os.path.splitext(os.path.basename(args.config))[0]
        try:
            study_name(name)
        except argparse.ArgumentTypeError:
            raise SearchError(
                f"--config {args.config}: its file name cannot name the study (it names a "
                "folder); pass --study NAME"
            ) from None
        args.study = name
    return args, fit_overrides


def check_heartbeat(args: argparse.Namespace) -> None:
    """``--heartbeat`` and ``--grace`` are for RDB storages (a journal file has no heartbeat:
    the processes of its one machine are watched instead); the grace outlasts a heartbeat."""
    given = [f"--{name}" for name in ("heartbeat", "grace") if getattr(args, name) is not None]
    if given and not is_url(args.storage):
        raise SearchError(
            f"{' and '.join(given)}: only an RDB storage (--storage postgresql://...) keeps "
            "heartbeats; with a journal file, the trials of dead processes on this machine are "
            "found without them"
        )
    args.heartbeat = args.heartbeat or HEARTBEAT_SECONDS
    args.grace = args.grace or GRACE_HEARTBEATS * args.heartbeat
    if args.grace <= args.heartbeat:
        raise SearchError(
            f"--grace {args.grace}: must be longer than --heartbeat {args.heartbeat}, or live "
            "trials would be failed between two heartbeats"
        )


def whole_number(minimum: int):
    """An argparse type: a whole number of at least ``minimum``."""

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


def main_tune(argv: list[str] | None = None) -> None:
    """The search: check everything once, run the trials (here, or in ``--workers``
    processes), then report the best trials and write the best config."""
    argv = sys.argv[1:] if argv is None else argv
    sys.argv[0] = "python -m fashion_lightning"  # the fit command's messages name it so
    # heartbeats and the matplotlib plots are marked experimental in Optuna 5
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # the trials run the fit command line in this process on purpose (one CLI, one parser)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    no_traceback_for_known_errors()
    args, fit_overrides = parse_args(argv)
    STOPS.install()
    if args.worker_of:  # one of --workers processes: share the machine's cores
        stop_when_parent_dies(args.parent_pid)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.worker_of))
        Search(args, fit_overrides).work()
        return
    search = Search(args, fit_overrides)
    if args.workers > 1:
        STOPS.check()  # a signal while the study was written: no worker starts
        search.fail_lost_trials()
        code = run_workers(argv, args.workers)
        if code:
            raise SystemExit(code)
    search.work()  # with workers: what a killed one left undone
    best = report.summary(search)
    if args.confirm_seeds > 0:
        report.confirm(search, best, args.confirm_seeds)
    print(f"optuna-dashboard {shlex.quote(shown(search.storage_spec))}    # to watch the study")
    print(f"best config: {best}")


def main(argv: list[str] | None = None) -> None:
    """``python -m fashion_lightning.tune``: one-line errors and signal exit codes, as ``fit``."""
    try:
        main_tune(argv)
    except UserError as err:
        exit_with(err)
