"""The search file: dotted config keys mapped to Optuna distributions, checked against the fit
command line before any trial runs, and the sampled values as that command line's overrides."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from fashion_lightning import cli
from fashion_lightning.errors import FitArgumentsError, SearchError
from fashion_lightning.tune.workers import STOPS

DISTRIBUTIONS = {
    "float": FloatDistribution,
    "int": IntDistribution,
    "categorical": CategoricalDistribution,
}
SCALARS = (bool, int, float, str, type(None))  # what a categorical choice may be


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last
    silently: one of the two ranges would not be searched, unseen)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *anchor, whose keys may repeat
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:  # not hashable: PyYAML's own check says so
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_search_space(path: Path) -> dict[str, BaseDistribution]:
    """The search file: ``dotted.config.key: {type: float|int|categorical, <Optuna's arguments>}``."""
    try:
        content = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # a SafeLoader
    except OSError as err:
        raise SearchError(f"--search {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SearchError(
            f"--search {path}: not valid YAML ({' '.join(str(err).split())})"
        ) from None
    if not isinstance(content, dict) or not content:
        raise SearchError(
            f"--search {path}: expected a mapping of config keys to distributions, e.g. "
            "'model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}'"
        )
    space = {}
    for key, spec in content.items():
        arguments = dict(spec) if isinstance(spec, dict) else {}
        kind = arguments.pop("type", None)
        if kind not in DISTRIBUTIONS:
            raise SearchError(
                f"--search {path}: {key}: 'type' must be one of {', '.join(DISTRIBUTIONS)}, got {kind!r}"
            )
        for bound in ("low", "high", "step"):
            if arguments.get(bound) is not None:
                arguments[bound] = _number(arguments[bound])
                if kind == "int" and not _is_whole(arguments[bound]):
                    raise SearchError(
                        f"--search {path}: {key}: an int range's {bound} must be a whole "
                        f"number, got {arguments[bound]!r}"
                    )
        if kind == "categorical" and not all(
            isinstance(choice, SCALARS) for choice in arguments.get("choices") or ()
        ):
            raise SearchError(
                f"--search {path}: {key}: choices must be numbers, strings, booleans or null "
                "(Optuna stores them); for classes, list class paths such as "
                "[torch.optim.SGD, torch.optim.AdamW]"
            )
        try:
            space[str(key)] = DISTRIBUTIONS[kind](**arguments)
        except (TypeError, ValueError) as err:
            raise SearchError(f"--search {path}: {key}: {err}") from None
    return space


def _number(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as text; take it as the number it means."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                pass
    return value


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sample(trial: optuna.Trial, key: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(key, distribution.choices)
    suggest = (
        trial.suggest_int if isinstance(distribution, IntDistribution) else trial.suggest_float
    )
    return suggest(
        key, distribution.low, distribution.high, step=distribution.step, log=distribution.log
    )


def config_text(value: Any) -> str:
    """A value as the fit command line reads it and a config writes it (null, true, 0.001)."""
    return value if isinstance(value, str) else json.dumps(value)


def overrides(params: dict[str, Any]) -> list[str]:
    """``--key=value`` for each sampled value."""
    return [f"--{key}={config_text(value)}" for key, value in params.items()]


def fit_config(config: Path, arguments: list[str]) -> dict:
    """The complete fit config for these arguments, as ``fit --print_config`` prints it: the
    fit command line itself checks them; what it refuses is raised with its one-line reason."""
    printed, errors = io.StringIO(), io.StringIO()
    with redirect_stdout(printed), redirect_stderr(errors):
        try:
            cli.main(["fit", "--config", str(config), *arguments, "--print_config"])
        except SystemExit as exit_:
            STOPS.check()  # the fit stopped for a signal: not a refusal
            if exit_.code:
                lines = errors.getvalue().strip().splitlines() or [f"exit {exit_.code}"]
                reason = next((x for x in reversed(lines) if x.startswith("error: ")), lines[-1])
                raise FitArgumentsError(reason.removeprefix("error: ")) from None
    return yaml.safe_load(printed.getvalue())


def check_space(
    space: dict[str, BaseDistribution],
    config_path: Path,
    fit_overrides: list[str],
    search: Path,
    probe: bool = True,
) -> dict:
    """Refuse, before any trial, a key the fit config lacks and a value that does not parse
    where it goes: each end of every range and every choice is tried (unless ``probe`` is
    false: a worker, whose command tried them). Returns the config."""
    config = fit_config(config_path, fit_overrides)
    for key, distribution in space.items():
        node = config
        for part in key.split("."):
            node = _last_in_list(node, part)
            if not isinstance(node, dict) or part not in node:
                raise SearchError(
                    f"--search {search}: {key} is not a key of the fit config {config_path} "
                    "(keys are as in `python -m fashion_lightning fit --config ... --print_config`, "
                    "e.g. model.optimizer.init_args.lr)"
                )
            node = node[part]
        if isinstance(node, dict) and not isinstance(distribution, CategoricalDistribution):
            raise SearchError(
                f"--search {search}: {key} is a group of settings, not a number: search one of "
                f"its keys, e.g. {key}.{next(iter(node), 'lr')}"
            )
    for values in _probes(space) if probe else ():
        try:
            fit_config(config_path, [*fit_overrides, *overrides(values)])
        except FitArgumentsError:
            for key, value in values.items():  # which one: only now, one key at a time
                try:
                    fit_config(config_path, [*fit_overrides, *overrides({key: value})])
                except FitArgumentsError as err:
                    raise SearchError(
                        f"--search {search}: {key}: {value!r} is refused: {err}"
                    ) from None
            raise
    return config


def _last_in_list(node: Any, key: str) -> Any:
    """In a list of classes (``trainer.callbacks``), the init_args of the last one, where
    jsonargparse puts ``--trainer.callbacks.decay``: the key a search file writes for it."""
    if isinstance(node, list) and node and isinstance(node[-1], dict):
        last = node[-1]
        return last if key in last else last.get("init_args", last)
    return node


def _probes(space: dict[str, BaseDistribution]) -> list[dict[str, Any]]:
    """Values that together cover both ends of every range and every choice."""
    lengths = [len(d.choices) for d in space.values() if isinstance(d, CategoricalDistribution)]
    return [
        {
            key: d.choices[min(i, len(d.choices) - 1)]
            if isinstance(d, CategoricalDistribution)
            else (d.low if i == 0 else d.high)
            for key, d in space.items()
        }
        for i in range(max([2, *lengths]))
    ]
