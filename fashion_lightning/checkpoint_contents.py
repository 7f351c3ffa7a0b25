"""What a checkpoint may hold, entry by entry, checked before anything is built or run.

Lightning restores what a checkpoint holds as it finds it: a string where it expects a mapping
is a traceback deep in its loops, a count that is not a number breaks the training later, and
``ModelCheckpoint`` deletes the files its restored state names when better ones replace them
(``fs.rm(path, recursive=True)``: a folder too), deciding that a path is its own by comparing
text (``<folder>/../../x`` passes). So each entry is checked against what this project and
Lightning write, in two passes:

- :func:`check_contents`, when the file is read: the kinds of every entry, and the files a
  checkpoint callback's state names, which must be ``.ckpt`` files inside its own folder after
  ``..`` and links are resolved;
- :func:`check_restorable`, once the command's Trainer is built, before it runs: the loops',
  optimizer's, scheduler's and callbacks' states are like the ones this Trainer would write.

What no check foresees is caught while Lightning restores (:mod:`fashion_lightning.cli`).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fsspec.core import split_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.migration import migrate_checkpoint
from packaging.version import InvalidVersion, Version
from torch.optim.lr_scheduler import ReduceLROnPlateau

from fashion_lightning.schedules import make_scheduler

CHECKPOINT_SUFFIX = ModelCheckpoint.FILE_EXTENSION  # what every ModelCheckpoint file ends with
# the keys of a checkpoint callback's state that name files it may later delete or read
PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")
SCORE_KEYS = ("best_model_score", "current_score", "kth_value")
# the counts ResumableTraining writes (batches_done: checkpoints of earlier versions)
RESUME_COUNTS = ("epoch", "images_done", "batches_done")
LOOP_STEPS = ("project", "lightning")  # who trained the run: fashion_lightning.steps.LOOP_KEY
# what LightningCLI itself writes into hyper_parameters (load_from_checkpoint's hook)
LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
VERSION_KEY = "pytorch-lightning_version"  # the Lightning that wrote it


class Refused(Exception):
    """An entry that is not what this project writes: its key and what is wrong with it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")


def url_problem(path: str) -> str | None:
    """Why ``path`` is not a plain local path (fsspec would open a URL, ``data:`` included)."""
    protocol, _ = split_protocol(path)
    if protocol or "::" in path or "://" in path:
        return "is a URL, not a local file"
    if "\x00" in path:
        return "holds a NUL character"
    return None


def checkpoint_file_problem(path: Any, folder: str) -> str | None:
    """Why ``path`` is not a checkpoint file inside ``folder`` (both as a checkpoint names
    them, relative to the working folder), or None: a local ``.ckpt`` path without ``..``,
    inside ``folder`` as written and once links are resolved, and not a folder."""
    if not isinstance(path, str):
        return f"{path!r} is not a path"
    problem = url_problem(path)
    if problem:
        return f"{path!r} {problem}"
    if not path.endswith(CHECKPOINT_SUFFIX):
        return f"{path!r} is not a {CHECKPOINT_SUFFIX} file"
    if ".." in Path(path).parts:
        return f"{path!r} leads out of its folder with '..'"
    inside = Path(os.path.abspath(folder)) in Path(os.path.abspath(path)).parents
    if not inside or Path(os.path.realpath(folder)) not in Path(os.path.realpath(path)).parents:
        return f"{path!r} is not inside the run's checkpoint folder {folder!r}"
    if os.path.isdir(path):
        return f"{path!r} is a folder"
    return None


def upgrade(contents: dict[str, Any]) -> None:
    """Lightning's own upgrade of a checkpoint of an older Lightning (it moves old keys into
    callbacks' states), applied before the checks, so that they see what Lightning restores
    (Lightning then finds nothing to upgrade)."""
    version = contents.get(VERSION_KEY)
    try:
        Version(version)
    except (InvalidVersion, TypeError):
        raise Refused(VERSION_KEY, f"{version!r} is not a version") from None
    try:
        migrate_checkpoint(contents)
    except Exception as err:  # a crafted old-format entry that Lightning's upgrade chokes on
        raise Refused(
            VERSION_KEY,
            f"Lightning cannot upgrade this checkpoint of {version} ({type(err).__name__})",
        ) from None


def forget_foreign_files(contents: dict[str, Any], path: Path) -> None:
    """Empty the files a checkpoint callback's state names unless they are the checkpoint's own
    neighbours: a state's record of its files is trusted only in the folder that holds the file
    it came in. (Another folder's files, named by a file someone hands over, would be deleted
    when better checkpoints replace them: a folder several runs share, a --checkpoint.dirpath.)"""
    own = Path(os.path.realpath(path)).parent
    for state in (contents.get("callbacks") or {}).values():
        if not _is_checkpoint_state(state):
            continue
        folder = state.get("dirpath")
        if folder is not None and Path(os.path.realpath(folder)) == own:
            continue
        state.update(
            best_k_models={}, kth_best_model_path="", best_model_path="", last_model_path=""
        )


def _is_checkpoint_state(state: Any) -> bool:
    return isinstance(state, Mapping) and any(
        k in state for k in (*PATH_KEYS, "best_k_models", "dirpath")
    )


def check_contents(contents: Mapping[str, Any]) -> None:
    """Refused unless every entry that Lightning or the project restores has the kind they
    write; the checkpoint files a callback's state names are checked for where they lie."""
    for key in ("epoch", "global_step"):
        if key in contents:
            _expect_count(contents[key], key)
    _expect_tensors(contents["state_dict"], "state_dict")
    for key in ("current_model_state", "averaging_state"):  # WeightAveraging's
        if key in contents:
            _expect_tensors(contents[key], key)
    loops = contents.get("loops")
    if loops is not None:
        for name, state in _expect_mapping(loops, "loops").items():
            _expect_mapping(state, f"loops.{name}")
    callbacks = _expect_mapping(contents.get("callbacks") or {}, "callbacks")
    for name, state in callbacks.items():
        key = f"callbacks.{str(name).split('{', 1)[0]}"  # without the state key's settings
        state = _expect_mapping(state, key)
        if name == "ResumableTraining":
            _check_resume_state(state, key)
        elif _is_checkpoint_state(state):
            check_checkpoint_state(state, key)
    for i, state in enumerate(
        _expect_list(contents.get("optimizer_states") or [], "optimizer_states")
    ):
        state = _expect_mapping(state, f"optimizer_states.{i}")
        _expect_mapping(state.get("state", {}), f"optimizer_states.{i}.state")
        for j, group in enumerate(
            _expect_list(state.get("param_groups", []), f"optimizer_states.{i}.param_groups")
        ):
            _expect_mapping(group, f"optimizer_states.{i}.param_groups.{j}")
    for i, state in enumerate(_expect_list(contents.get("lr_schedulers") or [], "lr_schedulers")):
        _expect_mapping(state, f"lr_schedulers.{i}")
    data = _expect_mapping(
        contents.get("datamodule_hyper_parameters") or {}, "datamodule_hyper_parameters"
    )
    for key, value in data.items():
        if key == "_instantiator" and value != LIGHTNING_INSTANTIATOR:
            raise Refused(f"datamodule_hyper_parameters.{key}", f"names {value!r}, never written")
        if not _plain(value):
            raise Refused(f"datamodule_hyper_parameters.{key}", "is not a plain value")
    steps = (contents.get("hyper_parameters") or {}).get("steps_per_call", 1)
    if type(steps) is not int or steps < 1:
        raise Refused(
            "hyper_parameters.steps_per_call", f"{steps!r} is not a positive whole number"
        )
    if contents.get("optimizer_steps_loop", LOOP_STEPS[0]) not in LOOP_STEPS:
        raise Refused("optimizer_steps_loop", f"is neither of {LOOP_STEPS}")


def check_checkpoint_state(state: Mapping[str, Any], key: str) -> None:
    """A ``ModelCheckpoint``'s state: scores are numbers, and each file it names (which it may
    delete once a better one replaces it, or load as the best) is a ``.ckpt`` file inside the
    checkpoint folder the state records."""
    folder = state.get("dirpath")
    named = {k: state.get(k) for k in PATH_KEYS if state.get(k) not in (None, "")}
    best_k = _expect_mapping(state.get("best_k_models") or {}, f"{key}.best_k_models")
    named.update({f"best_k_models[{path!r}]": path for path in best_k})
    for name in SCORE_KEYS:
        if state.get(name) is not None and not _is_score(state[name]):
            raise Refused(f"{key}.{name}", "is not a score")
    for path, score in best_k.items():
        if not _is_score(score):
            raise Refused(f"{key}.best_k_models[{path!r}]", "is not a score")
    if state.get("monitor") is not None and not isinstance(state["monitor"], str):
        raise Refused(f"{key}.monitor", "is not a metric's name")
    if folder is None:
        if named:
            raise Refused(f"{key}.dirpath", "is missing, and the state names checkpoint files")
        return
    if not isinstance(folder, str) or url_problem(folder):
        raise Refused(f"{key}.dirpath", f"{folder!r} is not a local folder")
    for name, path in named.items():
        problem = checkpoint_file_problem(path, folder)
        if problem:
            raise Refused(f"{key}.{name}", problem)


def _check_resume_state(state: Mapping[str, Any], key: str) -> None:
    for name, value in state.items():
        if name in RESUME_COUNTS:
            _expect_count(value, f"{key}.{name}")
        elif name == "epoch_finished":
            if not isinstance(value, bool):
                raise Refused(f"{key}.{name}", "is not true or false")
        elif name == "rng":
            _check_rng(value, f"{key}.rng")
        else:
            raise Refused(f"{key}.{name}", "is not a key this project writes")


def _check_rng(state: Any, key: str) -> None:
    """The random generators' states, as ``torch.get_rng_state()`` gives them."""
    state = _expect_mapping(state, key)
    size = torch.get_rng_state().numel()
    cpu = state.get("torch")
    if not _is_bytes(cpu) or cpu.numel() != size:
        raise Refused(f"{key}.torch", f"is not the {size} bytes of a CPU generator's state")
    for i, cuda in enumerate(_expect_list(state.get("cuda", []), f"{key}.cuda")):
        if not _is_bytes(cuda):
            raise Refused(f"{key}.cuda.{i}", "is not a CUDA generator's state")
    if set(state) - {"torch", "cuda"}:
        raise Refused(
            key, f"holds {sorted(set(state) - {'torch', 'cuda'})}, which this project never writes"
        )


def check_restorable(
    contents: Mapping[str, Any], trainer: Any, model: torch.nn.Module, fitting: bool
) -> None:
    """Refused unless what Lightning will restore into this Trainer is like what it writes:
    the loops (``fit`` only), the optimizer's and scheduler's states, and the states of
    Lightning's and the project's callbacks. The strategy must read the checkpoint through
    the checkpoint IO, which hands over the file that was checked."""
    if type(trainer.strategy).load_checkpoint is not Strategy.load_checkpoint:
        raise Refused(
            "strategy",
            f"{type(trainer.strategy).__name__} reads checkpoints itself, which this project "
            "cannot check; resume with the ddp or the default strategy",
        )
    if fitting:
        loops = contents.get("loops") or {}
        for name in loops:
            loop = getattr(trainer, name, None)
            if loop is None:
                raise Refused(f"loops.{name}", "is not one of Lightning's loops")
            like(loops[name], loop.state_dict(), f"loops.{name}", counts=True)
        _check_optimizer_and_schedule(
            contents.get("optimizer_states") or [], contents.get("lr_schedulers") or [], model
        )
        _check_precision_state(contents, trainer)
    _check_callback_states(contents.get("callbacks") or {}, trainer)


def _check_optimizer_and_schedule(optimizers: list, schedulers: list, model: Any) -> None:
    """The optimizer's and scheduler's states as ``model.optimizer`` and ``model.lr_scheduler``
    write them for this model: one optimizer with the model's parameter groups (and the keys a
    schedule adds to them), tensors of each parameter's shape, a scheduler of the model's kind
    with its settings. Then both are built on copies of the parameters, take these states, and
    make a step with zero gradients: what fails here, or gives a learning rate or a weight that
    is not a number, would fail in training."""
    if len(optimizers) > 1:
        raise Refused("optimizer_states", f"holds {len(optimizers)} optimizers; the model has one")
    if schedulers and (model.lr_scheduler is None or len(schedulers) != 1):
        has = "one" if model.lr_scheduler is not None else "none"
        raise Refused("lr_schedulers", f"holds {len(schedulers)} schedulers; the model has {has}")
    parameters = [p.detach().clone() for p in model.parameters()]
    optimizer = model.optimizer(parameters)
    scheduler = None
    if model.lr_scheduler is not None:  # a fixed-length schedule as long as the resumed one
        length = (
            schedulers[0].get("total_steps")
            if schedulers and isinstance(schedulers[0], Mapping)
            else None
        )
        scheduler = make_scheduler(
            model, optimizer, total_steps=length if type(length) is int and length > 0 else 1
        )
    if optimizers:
        _check_optimizer_state(optimizers[0], optimizer.state_dict(), parameters)
    if schedulers:
        _check_scheduler_state(schedulers[0], scheduler.state_dict())
    try:
        if optimizers:
            optimizer.load_state_dict(copy.deepcopy(optimizers[0]))
        for parameter in parameters:
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
    except Exception as err:  # what training would meet at its first step
        raise Refused(
            "optimizer_states.0", f"cannot make a step ({type(err).__name__}: {err})"
        ) from None
    if not all(bool(torch.isfinite(parameter).all()) for parameter in parameters):
        raise Refused("optimizer_states.0", "turns weights into numbers that are not finite")
    rates = [group["lr"] for group in optimizer.param_groups]
    try:
        if schedulers:
            scheduler.load_state_dict(copy.deepcopy(schedulers[0]))
            if not isinstance(scheduler, ReduceLROnPlateau):  # it computes no rate by itself
                with warnings.catch_warnings():  # get_lr outside step(): the next step's rate
                    warnings.simplefilter("ignore")
                    rates = scheduler.get_lr()
    except Exception as err:
        raise Refused(
            "lr_schedulers.0", f"cannot make a step ({type(err).__name__}: {err})"
        ) from None
    if not all(math.isfinite(float(rate)) for rate in rates):
        raise Refused(
            "lr_schedulers.0" if schedulers else "optimizer_states.0",
            f"gives the learning rate {rates}",
        )


# what a scheduler counts as it goes; its other entries are its settings
SCHEDULE_PROGRESS = (
    "last_epoch",
    "_step_count",
    "_last_lr",
    "_get_lr_called_within_step",
    "_is_initial",
    "best",
    "num_bad_epochs",
    "cooldown_counter",
)


def _check_scheduler_state(state: Any, expected: dict) -> None:
    """A scheduler restores whatever it is given as its attributes: its settings (the phases of
    a one-cycle schedule, its anneal function...) must be the ones the model's
    ``lr_scheduler`` makes, and what it counts must be of the kind it counts."""
    state = _expect_mapping(state, "lr_schedulers.0")
    like(state, expected, "lr_schedulers.0", texts=True)
    for name, value in state.items():
        if name not in SCHEDULE_PROGRESS and value != expected[name]:
            raise Refused(
                f"lr_schedulers.0.{name}",
                f"is {value!r}, where the model's scheduler has {expected[name]!r}",
            )


def _check_optimizer_state(state: Any, expected: dict, parameters: list) -> None:
    state = _expect_mapping(state, "optimizer_states.0")
    groups = _expect_list(state.get("param_groups", []), "optimizer_states.0.param_groups")
    if len(groups) != len(expected["param_groups"]):
        raise Refused("optimizer_states.0.param_groups", "does not match the model's optimizer")
    for i, (group, reference) in enumerate(zip(groups, expected["param_groups"], strict=True)):
        key = f"optimizer_states.0.param_groups.{i}"
        group = _expect_mapping(group, key)
        if group.get("params") != reference["params"]:
            raise Refused(f"{key}.params", "does not match the model's parameters")
        for name, value in group.items():
            if name not in reference:
                raise Refused(f"{key}.{name}", "is not a key the model's optimizer writes")
            like(value, reference[name], f"{key}.{name}")
            if isinstance(value, float) and not math.isfinite(value):
                raise Refused(f"{key}.{name}", f"{value} is not a finite number")
    for index, values in _expect_mapping(
        state.get("state", {}), "optimizer_states.0.state"
    ).items():
        key = f"optimizer_states.0.state.{index}"
        if type(index) is not int or not 0 <= index < len(parameters):
            raise Refused(key, "names no parameter of the model")
        shape = parameters[index].shape
        for name, value in _expect_mapping(values, key).items():
            if isinstance(value, torch.Tensor):
                if value.dim() and value.shape != shape:
                    raise Refused(
                        f"{key}.{name}",
                        f"has shape {tuple(value.shape)}, not the parameter's {tuple(shape)}",
                    )
            elif not _plain(value):
                raise Refused(f"{key}.{name}", "is not a tensor or a number")


def _check_precision_state(contents: Mapping[str, Any], trainer: Any) -> None:
    """A precision plugin's state (a gradient scaler's) like the one the run's plugin writes,
    with a scale that is a positive number."""
    plugin = trainer.precision_plugin
    key = type(plugin).__qualname__
    if key not in contents:
        return
    like(contents[key], plugin.state_dict(), key)
    scale = _expect_mapping(contents[key], key).get("scale")
    if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale < math.inf):
        raise Refused(f"{key}.scale", f"{scale!r} is not a positive number")


def _check_callback_states(states: Mapping[str, Any], trainer: Any) -> None:
    """The states of Lightning's callbacks this Trainer has, like the ones they write (the
    checkpoint callbacks' and the project's were checked when the file was read; a user's own
    callback reads its own state)."""
    for callback in trainer.callbacks:
        state = states.get(callback.state_key)
        module = type(callback).__module__
        if state is None or isinstance(callback, ModelCheckpoint):
            continue
        if module.startswith("lightning.") and not module.startswith(
            "lightning.pytorch.callbacks.model_checkpoint"
        ):
            like(state, callback.state_dict(), f"callbacks.{callback.state_key}")


def like(value: Any, reference: Any, key: str, counts: bool = False, texts: bool = False) -> None:
    """Refused unless ``value`` has the kind of ``reference``, a state this Lightning writes:
    mappings hold only its keys (each like its value), lists as many items, tensors the same
    dtype and shape, numbers are numbers (``counts``: whole and not negative), text is text
    (``texts``: the same text, a setting).
    A ``None`` in the reference takes a plain value or a single-number tensor."""
    if isinstance(reference, Mapping):
        value = _expect_mapping(value, key)
        for name, item in value.items():
            if name not in reference:
                raise Refused(f"{key}.{name}", "is not a key that Lightning writes there")
            like(item, reference[name], f"{key}.{name}", counts, texts)
    elif isinstance(reference, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(reference):
            raise Refused(key, f"is not a list of {len(reference)}")
        for i, (item, expected) in enumerate(zip(value, reference, strict=True)):
            like(item, expected, f"{key}.{i}", counts, texts)
    elif isinstance(reference, torch.Tensor):
        if (
            not isinstance(value, torch.Tensor)
            or value.dtype != reference.dtype
            or value.shape != reference.shape
        ):
            raise Refused(
                key, f"is not a {reference.dtype} tensor of shape {tuple(reference.shape)}"
            )
    elif isinstance(reference, bool):
        if not isinstance(value, bool):
            raise Refused(key, "is not true or false")
    elif isinstance(reference, int):
        if type(value) is not int or (counts and value < 0):
            raise Refused(key, "is not a count" if counts else "is not a whole number")
    elif isinstance(reference, float):
        if type(value) not in (int, float):
            raise Refused(key, "is not a number")
    elif isinstance(reference, str):
        if not isinstance(value, str):
            raise Refused(key, "is not text")
        if texts and value != reference:
            raise Refused(key, f"is {value!r}, where the model's scheduler writes {reference!r}")
    elif reference is None and not (_plain(value) or _is_score(value)):
        raise Refused(key, "is not a plain value")


def _expect_mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise Refused(key, f"is a {type(value).__name__}, not a mapping")
    return value


def _expect_list(value: Any, key: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise Refused(key, f"is a {type(value).__name__}, not a list")
    return list(value)


def _expect_count(value: Any, key: str) -> None:
    if type(value) is not int or value < 0:
        raise Refused(key, f"{value!r} is not a count")


def _expect_tensors(value: Any, key: str) -> None:
    for name, tensor in _expect_mapping(value, key).items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise Refused(f"{key}.{name}", "is not a named tensor")


def _is_score(value: Any) -> bool:
    if isinstance(value, torch.Tensor):  # a metric's value (an int for monitor=epoch)
        return value.numel() == 1 and value.dtype != torch.bool
    return type(value) in (int, float)


def _is_bytes(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
