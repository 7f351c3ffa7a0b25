"""What a config may name and hold, wherever it comes from: a YAML file, the command line, a
checkpoint's hyperparameters or a study's stored trial. Configs and checkpoints travel between
people; they are data, and nothing in them may import or call code the project did not choose.

- jsonargparse imports every ``class_path`` a value names and, for a callable argument such as
  ``model.optimizer``, calls whatever it finds (``os.system`` included). Its import-path policy
  (:func:`restrict_imports`) denies everything but the packages below, before any import.
- ``model.optimizer`` must be an optimizer class and ``model.lr_scheduler`` a scheduler class
  (:func:`check_class`): jsonargparse checks that only for classes, not for functions.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace, set_parsing_settings

from fashion_lightning.errors import ConfigError

TRUSTED_IMPORTS_ENV = "FASHION_LIGHTNING_TRUSTED_IMPORTS"
# what a config may name: optimizers and schedulers, Lightning's callbacks, loggers, profilers,
# strategies and plugins, and the project's own logger (an entry allows what is under it)
ALLOWED_IMPORTS = (
    "torch.optim",
    # the plateau scheduler that LightningCLI lists, with its monitor: this class alone, not
    # the rest of lightning.pytorch.cli (LightningCLI itself, SaveConfigCallback...)
    "lightning.pytorch.cli.ReduceLROnPlateau",
    "lightning.pytorch.accelerators",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "lightning.pytorch.plugins",
    "lightning.pytorch.profilers",
    "lightning.pytorch.strategies",
    "lightning.fabric.plugins",
    "fashion_lightning.run_folders.RunFolderLogger",
)
# the class each callable argument of the model must be (or subclass)
ACCEPTED_CLASSES: dict[str, tuple[type, ...]] = {
    "optimizer": (torch.optim.Optimizer,),
    "lr_scheduler": (
        torch.optim.lr_scheduler.LRScheduler,
        torch.optim.lr_scheduler.ReduceLROnPlateau,
    ),
}
CONFIG_GROUPS = ("trainer", "model", "data", "checkpoint", "images")
# the configs the package ships (the repository's configs/ links here)
PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def trusted_imports() -> list[str]:
    """The modules a user trusts for their own classes (callbacks...), from the environment:
    a file someone hands over cannot set it."""
    return [entry for entry in os.environ.get(TRUSTED_IMPORTS_ENV, "").split(",") if entry]


def restrict_imports() -> None:
    """Let values name only :data:`ALLOWED_IMPORTS` and the user's trusted modules."""
    set_parsing_settings(
        import_path_denylist=["*"], import_path_allowlist=[*ALLOWED_IMPORTS, *trusted_imports()]
    )


def refused_import(message: str) -> str | None:
    """jsonargparse's refusal of an import, in this project's words (its own names a setting
    of jsonargparse's); None for any other message."""
    found = re.search(r"Importing '([^']+)' is not allowed", message)
    if found is None:
        return None
    key = re.search(r'Parser key "([^"]+)"', message)
    where = f'Parser key "{key.group(1)}": ' if key else ""
    return (
        f"{where}{found.group(1)!r} may not be named in a config: a config names optimizers "
        "and schedulers of torch.optim (and lightning.pytorch.cli.ReduceLROnPlateau), "
        "Lightning's callbacks, loggers, profilers, strategies and plugins; to use your own "
        f"module, list it in {TRUSTED_IMPORTS_ENV}"
    )


def seed_problem(seed: Any) -> str | None:
    """Why ``seed_everything`` cannot seed (Lightning raises a traceback), or None."""
    if isinstance(seed, bool) or not isinstance(seed, int) or 0 <= seed < 2**32:
        return None
    return f"a seed is a whole number from 0 to {2**32 - 1} (or true for a random one)"


def refused_weights_only(message: str) -> str | None:
    """jsonargparse's refusal of ``weights_only: false``, in this project's words."""
    if 'Parser key "weights_only"' not in message:
        return None
    return (
        "weights_only takes true or null only: this project reads every checkpoint with "
        "torch.load(weights_only=True), so that no checkpoint runs code (docs/trust.md)"
    )


def refused_class_argument(message: str) -> str | None:
    """jsonargparse's refusal of an optimizer's or scheduler's argument (a page of union types
    and 'Expected a path'), as the key, the value and the kinds it takes; None for others."""
    outer = re.match(r'Parser key "(model\.\w+)":', message)
    required = re.search(r"the following arguments are required: ([\w, ]+)", message)
    if outer is not None and required is not None:  # jsonargparse lists every union it tried
        names = [name.strip() for name in required.group(1).split(",") if name.strip()]
        return f'Parser key "{outer.group(1)}": it needs ' + ", ".join(
            f"--{outer.group(1)}.init_args.{name}" for name in names
        )
    given = re.search(r"class_path='([^']+)', init_args=Namespace\((\w+)=(.*?)\)\)", message)
    if outer is None or given is None:
        return None
    cls, name, value = given.groups()
    key = f'Parser key "{outer.group(1)}.init_args.{name}"'
    if re.search(rf"Option '{re.escape(name)}' is not accepted", message):
        return f"{key}: {cls} takes no argument {name!r}"
    if f'Parser key "{name}":' not in message:  # not about this value (the class itself)
        return None
    kinds = [k for k in ("int", "float", "bool", "list") if f"Expected a <class '{k}'>" in message]
    kinds = " or ".join(f"{'an' if k == 'int' else 'a'} {k}" for k in kinds) or "accepted"
    return f"{key}: {value} is not {kinds} ({cls})"


def loaded_object(path: str) -> Any:
    """The object a dotted path names, found among the modules already imported; None when the
    path names nothing loaded. Never imports (an import runs the module's code)."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:split]))
        if module is None:
            continue
        found: Any = module
        for name in parts[split:]:
            found = getattr(found, name, None)
        return found
    return None


def class_problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` as the model's callable argument ``key`` (``optimizer``,
    ``lr_scheduler``), or None: it must name a loaded class of :data:`ACCEPTED_CLASSES`."""
    if value is None:
        return None
    if isinstance(value, Namespace):
        value = value.as_dict()
    path = value.get("class_path") if isinstance(value, dict) else value
    if not isinstance(path, str):
        target = getattr(value, "func", value)  # jsonargparse hands a class over as a partial
        path = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
    found = loaded_object(path) if isinstance(path, str) and "." in path else None
    if isinstance(found, type) and issubclass(found, ACCEPTED_CLASSES[key]):
        return None
    kind = "an optimizer class (torch.optim.SGD, ...)"
    if key == "lr_scheduler":
        kind = "a learning-rate scheduler class (torch.optim.lr_scheduler.OneCycleLR, ...)"
    return f"{path!r} is not {kind}"


def check_model_classes(model: Namespace | dict) -> None:
    """ConfigError unless the model's optimizer and scheduler name accepted classes."""
    for key in ACCEPTED_CLASSES:
        problem = class_problem(key, model.get(key))
        if problem:
            raise ConfigError(f"--model.{key}: {problem}")


def packaged_config(name: str) -> str:
    """``name`` as given, or, when no such file exists, the config of that name the package
    ships: a short name (``sgd``, ``search/mlp``) or the path the README shows
    (``configs/sgd.yaml``), so that an installed package runs them from any folder."""
    if Path(name).exists():
        return name
    short = name.removeprefix("./").removeprefix("configs/")
    shipped = PACKAGED_CONFIGS / (short if short.endswith((".yaml", ".yml")) else f"{short}.yaml")
    inside = shipped.resolve().is_relative_to(PACKAGED_CONFIGS.resolve())
    return str(shipped) if inside and shipped.is_file() else name


def with_packaged_configs(
    args: list[str], options: tuple[str, ...] = ("--config", "-c")
) -> list[str]:
    """``args`` with the values of ``options`` made :func:`packaged_config` names."""
    given = list(args)
    for i, arg in enumerate(given):
        if arg in options and i + 1 < len(given):
            given[i + 1] = packaged_config(given[i + 1])
        elif arg.startswith(tuple(f"{option}=" for option in options)):
            option, value = arg.split("=", 1)
            given[i] = f"{option}={packaged_config(value)}"
    return given


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
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None  # missing files and YAML syntax errors get jsonargparse's own message
    if content is None:
        return "the file is empty (or only comments)"
    if not isinstance(content, dict):
        return f"it holds a {type(content).__name__}, not settings"
    for group in CONFIG_GROUPS:
        value = content.get(group)
        if value is not None and not isinstance(value, dict):
            return f"'{group}:' holds {value!r}, not settings"
    return None


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


def flat(config: Any, skip: tuple[str, ...] = (), prefix: str = "") -> dict[str, Any]:
    """``{"model.optimizer.init_args.lr": 0.001, ...}``: a config's leaves under their dotted
    keys, without the branches named in ``skip``."""
    if isinstance(config, Namespace):
        config = config.as_dict()
    if prefix in skip:
        return {}
    if not isinstance(config, dict):
        return {prefix: config}
    leaves = {}
    for key, value in config.items():
        leaves.update(flat(value, skip, f"{prefix}.{key}" if prefix else str(key)))
    return leaves
