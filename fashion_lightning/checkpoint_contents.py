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

import itertools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fsspec.core import split_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.migration import migrate_checkpoint
from packaging.version import InvalidVersion, Version

from fashion_lightning.optimizer_states import check_optimizer_and_schedule
from fashion_lightning.state_kinds import (
    Refused,
    expect_count,
    expect_list,
    expect_mapping,
    expect_tensors,
    is_bytes,
    is_score,
    like,
    plain,
)

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
            expect_count(contents[key], key)
    expect_tensors(contents["state_dict"], "state_dict")
    for key in ("current_model_state", "averaging_state"):  # WeightAveraging's
        if key in contents:
            expect_tensors(contents[key], key)
    loops = contents.get("loops")
    if loops is not None:
        for name, state in expect_mapping(loops, "loops").items():
            expect_mapping(state, f"loops.{name}")
    callbacks = expect_mapping(contents.get("callbacks") or {}, "callbacks")
    for name, state in callbacks.items():
        key = f"callbacks.{str(name).split('{', 1)[0]}"  # without the state key's settings
        state = expect_mapping(state, key)
        if name == "ResumableTraining":
            _check_resume_state(state, key, contents.get("epoch"))
        elif name == "HParamsSummary":
            _check_best_so_far(state, key, contents.get("epoch"))
        elif _is_checkpoint_state(state):
            check_checkpoint_state(state, key)
    for i, state in enumerate(
        expect_list(contents.get("optimizer_states") or [], "optimizer_states")
    ):
        state = expect_mapping(state, f"optimizer_states.{i}")
        expect_mapping(state.get("state", {}), f"optimizer_states.{i}.state")
        for j, group in enumerate(
            expect_list(state.get("param_groups", []), f"optimizer_states.{i}.param_groups")
        ):
            expect_mapping(group, f"optimizer_states.{i}.param_groups.{j}")
    for i, state in enumerate(expect_list(contents.get("lr_schedulers") or [], "lr_schedulers")):
        expect_mapping(state, f"lr_schedulers.{i}")
    data = expect_mapping(
        contents.get("datamodule_hyper_parameters") or {}, "datamodule_hyper_parameters"
    )
    for key, value in data.items():
        if key == "_instantiator" and value != LIGHTNING_INSTANTIATOR:
            raise Refused(f"datamodule_hyper_parameters.{key}", f"names {value!r}, never written")
        if not plain(value):
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
    best_k = expect_mapping(state.get("best_k_models") or {}, f"{key}.best_k_models")
    named.update({f"best_k_models[{path!r}]": path for path in best_k})
    for name in SCORE_KEYS:
        if state.get(name) is not None and not is_score(state[name]):
            raise Refused(f"{key}.{name}", "is not a score")
    for path, score in best_k.items():
        if not is_score(score):
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


def _check_resume_state(state: Mapping[str, Any], key: str, epoch: Any) -> None:
    """``ResumableTraining``'s state: counts, the epoch Lightning recorded beside it, and a
    random generator's state that torch takes."""
    for name, value in state.items():
        if name in RESUME_COUNTS:
            expect_count(value, f"{key}.{name}")
            if name == "epoch" and epoch is not None and value != epoch:
                raise Refused(f"{key}.epoch", f"{value} is not the checkpoint's epoch {epoch}")
        elif name == "epoch_finished":
            if not isinstance(value, bool):
                raise Refused(f"{key}.{name}", "is not true or false")
        elif name == "rng":
            _check_rng(value, f"{key}.rng")
        else:
            raise Refused(f"{key}.{name}", "is not a key this project writes")


def _check_rng(state: Any, key: str) -> None:
    """The random generators' states, as ``torch.get_rng_state()`` gives them."""
    state = expect_mapping(state, key)
    size = torch.get_rng_state().numel()
    cpu = state.get("torch")
    if not is_bytes(cpu) or cpu.numel() != size:
        raise Refused(f"{key}.torch", f"is not the {size} bytes of a CPU generator's state")
    try:  # the bytes hold a Mersenne Twister's state, which torch checks as it takes it
        torch.Generator().set_state(cpu)
    except RuntimeError:
        raise Refused(f"{key}.torch", "is not a state a CPU generator can take") from None
    for i, cuda in enumerate(expect_list(state.get("cuda", []), f"{key}.cuda")):
        if not is_bytes(cuda):
            raise Refused(f"{key}.cuda.{i}", "is not a CUDA generator's state")
    if set(state) - {"torch", "cuda"}:
        raise Refused(
            key, f"holds {sorted(set(state) - {'torch', 'cuda'})}, which this project never writes"
        )


def _check_best_so_far(state: Mapping[str, Any], key: str, epoch: Any) -> None:
    """``HParamsSummary``'s best validation accuracy so far (NaN: none yet), a fraction, and
    its epoch, counted from 1, not past the checkpoint's (``epoch``, counted from 0)."""
    best = state.get("best", math.nan)
    if type(best) not in (int, float) or not (math.isnan(best) or 0 <= best <= 1):
        raise Refused(f"{key}.best", f"{best!r} is not an accuracy (a fraction, 0 to 1)")
    best_epoch = state.get("best_epoch", 0)
    expect_count(best_epoch, f"{key}.best_epoch")
    if type(epoch) is int and best_epoch > epoch + 1:
        raise Refused(
            f"{key}.best_epoch", f"{best_epoch} is past the checkpoint's epoch ({epoch + 1})"
        )
    if set(state) - {"best", "best_epoch"}:
        raise Refused(key, f"holds {sorted(set(state) - {'best', 'best_epoch'})}, never written")


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
        if "optimizer_states" not in contents:  # (weights only: checkpoints.check_restores_into)
            raise Refused("optimizer_states", "is missing")
        if "loops" not in contents:
            # (Lightning would train from epoch 0 again, silently: not a resume)
            raise Refused("loops", "is missing: the checkpoint does not say where training stood")
        loops = contents.get("loops") or {}
        for name in loops:
            loop = getattr(trainer, name, None)
            if loop is None:
                raise Refused(f"loops.{name}", "is not one of Lightning's loops")
            like(loops[name], loop.state_dict(), f"loops.{name}", counts=True)
            _check_progress(loops[name], f"loops.{name}")
        check_optimizer_and_schedule(
            contents.get("optimizer_states") or [], contents.get("lr_schedulers") or [], model
        )
        _check_precision_state(contents, trainer)
    _check_callback_states(contents.get("callbacks") or {}, trainer)


# the stages of Lightning's progress counts, in the order each item goes through them
PROGRESS_STAGES = ("ready", "started", "processed", "completed")


def _check_progress(state: Mapping[str, Any], key: str) -> None:
    """Lightning's progress counts as its loops keep them: an item is ready, then started,
    processed and completed, so each count is at most the one before. Lightning takes others
    as they come and decides from them where a resumed epoch stands. (The current epoch's
    counts are not compared with the run's: an evaluation loop keeps no run total.)"""
    for scope in ("total", "current"):
        counts = state.get(scope)
        if not (isinstance(counts, Mapping) and "ready" in counts):
            continue
        present = [stage for stage in PROGRESS_STAGES if stage in counts]
        for before, after in itertools.pairwise(present):
            if counts[after] > counts[before]:
                raise Refused(
                    f"{key}.{scope}.{after}",
                    f"{counts[after]} is more than {before} ({counts[before]})",
                )
    for name, value in state.items():
        if isinstance(value, Mapping):
            _check_progress(value, f"{key}.{name}")


def _check_precision_state(contents: Mapping[str, Any], trainer: Any) -> None:
    """A precision plugin's state (a gradient scaler's) like the one the run's plugin writes,
    with a scale that is a positive number."""
    plugin = trainer.precision_plugin
    key = type(plugin).__qualname__
    if key not in contents:
        return
    like(contents[key], plugin.state_dict(), key)
    scale = expect_mapping(contents[key], key).get("scale")
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
