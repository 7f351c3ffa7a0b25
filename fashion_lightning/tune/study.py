"""Opening the study, and checking that it is the one this command continues: the same
config, search file, objective and direction, and no trial folder it does not know."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from fashion_lightning.errors import SearchError, UserError, first_line
from fashion_lightning.tune.space import config_text
from fashion_lightning.tune.storage import open_storage, scrubbed, shown
from fashion_lightning.tune.workers import STOPS

# the objectives a study can have, and which way is better
OBJECTIVES = {"val/acc": "maximize", "val/loss": "minimize"}


def open_study(
    args: argparse.Namespace, folder: Path, storage_spec: str, started: dict[str, Any]
) -> optuna.Study:
    """The study: an existing one is loaded and checked before anything is written to it
    (a refused continuation leaves the storage as it was); a new one is created."""
    storage = open_storage(args.storage, folder / "study.journal", args.heartbeat, args.grace)
    sampler, pruner = _sampler(args), _pruner(args)
    try:
        study = optuna.load_study(
            study_name=args.study, storage=storage, sampler=sampler, pruner=pruner
        )
    except KeyError:  # no such study yet
        study = None
    except Exception as err:
        raise _cannot_use(storage_spec, err) from None
    if study is None:
        check_trial_folders(args.study, [], storage_spec, folder)
        try:
            with STOPS.deferring():  # writes to the study are not cut short
                study = optuna.create_study(
                    study_name=args.study,
                    storage=storage,
                    direction=OBJECTIVES[args.objective],
                    sampler=sampler,
                    pruner=pruner,
                    load_if_exists=True,  # another machine may create it at the same moment
                )
        except Exception as err:
            raise _cannot_use(storage_spec, err) from None
    check_records(study, storage_spec)
    check_same_study(study, storage_spec, started)
    check_trial_folders(study.study_name, study.get_trials(deepcopy=False), storage_spec, folder)
    with STOPS.deferring():
        if study.user_attrs.get("started_with") is None:
            study.set_user_attr("started_with", started)
        if study.metric_names != [args.objective]:
            study.set_metric_names([args.objective])  # what optuna-dashboard calls it
    return study


def _sampler(args: argparse.Namespace) -> optuna.samplers.BaseSampler:
    """TPE after ``--startup_trials`` random ones; parallel workers' running trials count
    as their current worst (constant liar), so that they do not all sample the same."""
    return optuna.samplers.TPESampler(
        n_startup_trials=args.startup_trials, multivariate=True, constant_liar=True
    )


def _pruner(args: argparse.Namespace) -> optuna.pruners.BasePruner:
    if args.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=args.startup_trials, n_warmup_steps=args.warmup_epochs
    )


def _cannot_use(storage_spec: str, err: Exception) -> UserError:
    STOPS.check()  # a signal, not the storage
    return UserError(
        f"--storage {shown(storage_spec)}: cannot use the study "
        f"({scrubbed(first_line(err), storage_spec)})"
    )


# what the search writes into a trial's user attributes (and reads back), and its kinds
TRIAL_RECORDS: dict[str, tuple[type, ...]] = {
    "host": (str,),
    "pid": (int,),
    "process_start": (str, type(None)),  # /proc's clock ticks, as text
    "run_dir": (str,),
    "seconds": (int, float),
    "config": (str,),
    "retries": (int,),
    "retry_of": (int,),
}


def check_records(study: optuna.Study, storage_spec: str) -> None:
    """A study someone hands over is data: each record the search reads back has the kind
    it writes, and each trial's config (one of them becomes best.yaml) is a YAML mapping of
    plain values (safe_load: no tags, no code)."""
    where = f"study {study.study_name} in {shown(storage_spec)}"
    started = study.user_attrs.get("started_with")
    if started is not None and not (
        isinstance(started, dict) and all(isinstance(v, (dict, str)) for v in started.values())
    ):
        raise SearchError(f"{where}: its started_with is not what the search writes; {ALTERED}")
    for trial in study.get_trials(deepcopy=False):
        for key, kinds in TRIAL_RECORDS.items():
            value = trial.user_attrs.get(key)
            if key in trial.user_attrs and (
                isinstance(value, bool) or not isinstance(value, kinds)
            ):
                raise SearchError(
                    f"{where}: trial {trial.number}'s {key} is {value!r}, not what the search "
                    f"writes; {ALTERED}"
                )
        config = trial.user_attrs.get("config")
        if config is not None and not _is_mapping(config):
            raise SearchError(
                f"{where}: trial {trial.number}'s config is not a YAML mapping of settings; "
                f"{ALTERED}"
            )


ALTERED = "the study was altered; start another with --study NAME"


def check_queued(
    study: optuna.Study, space: dict[str, BaseDistribution], storage_spec: str
) -> None:
    """The parameters queued to run next (a stopped trial's, retried) are values of the search
    space: anything else was written into the study by other means."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        fixed = trial.system_attrs.get("fixed_params") or {}
        for key, value in fixed.items() if isinstance(fixed, dict) else [("?", fixed)]:
            distribution = space.get(key)
            if distribution is None or not _contains(distribution, value):
                raise SearchError(
                    f"study {study.study_name} in {shown(storage_spec)}: trial {trial.number} is "
                    f"queued with {key} {value!r}, which the search file does not hold; {ALTERED}"
                )


def _contains(distribution: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` is one the distribution draws (a choice, or a number in range)."""
    if isinstance(distribution, CategoricalDistribution):
        return any(value == c and type(value) is type(c) for c in distribution.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return distribution.low <= value <= distribution.high


def _is_mapping(text: str) -> bool:
    try:
        return isinstance(yaml.safe_load(text), dict)
    except yaml.YAMLError:
        return False


def check_same_study(study: optuna.Study, storage_spec: str, started: dict[str, Any]) -> None:
    """A study continues only with the config, search and objective it started with: trials
    of another config or space would be ranked together (and Optuna refuses a changed
    distribution). Machine-specific paths may differ (several machines, own folders)."""
    direction = OBJECTIVES[started["objective"]]
    if study.direction.name.lower() != direction:  # a study begun by other means
        raise SearchError(
            f"study {study.study_name} in {shown(storage_spec)} was created to "
            f"{study.direction.name.lower()} its objective, and --objective "
            f"{started['objective']} is to {direction}; start another with --study NAME"
        )
    recorded = study.user_attrs.get("started_with")
    if recorded is None:
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
    """A search file's distribution as a user writes it (``low..high``, ``[a, b]``), other
    values as they are."""
    if isinstance(value, str) and value.startswith("{"):
        try:
            distribution: BaseDistribution = optuna.distributions.json_to_distribution(value)
        except (ValueError, KeyError):
            return value
        choices = getattr(distribution, "choices", None)
        if choices is not None:
            return "[" + ", ".join(config_text(c) for c in choices) + "]"
        step = getattr(distribution, "step", None)
        written = f"{distribution.low}..{distribution.high}"
        if getattr(distribution, "log", False):
            written += " log"
        if step is not None and not (isinstance(distribution, IntDistribution) and step == 1):
            written += f" step {step}"
        return written
    return str(value)


def check_trial_folders(
    study_name: str, trials: list[FrozenTrial], storage_spec: str, folder: Path
) -> None:
    """Every trial_N folder here belongs to a trial of this study: a study started anew
    (another storage, a deleted journal) would otherwise log into an old trial's folder."""
    known = {
        t.number
        for t in trials
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
            f"which the study {study_name} in {shown(storage_spec)} does not know "
            "(another study of this name, or its storage was replaced): start another with "
            "--study NAME, or move that folder away"
        )
