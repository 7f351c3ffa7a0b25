"""A checkpoint's optimizer and scheduler states, checked against the ones the model makes.

torch restores an optimizer's or a scheduler's state as it finds it (settings included) and
checks nothing until a step fails or trains wrong, so each state is compared with the one
``model.optimizer`` and ``model.lr_scheduler`` write, then tried on copies of the weights.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from fashion_lightning.schedules import make_scheduler
from fashion_lightning.state_kinds import Refused, expect_list, expect_mapping, like, plain


def check_optimizer_and_schedule(optimizers: list, schedulers: list, model: Any) -> None:
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
        built = optimizer.state_dict()
        _check_optimizer_state(optimizers[0], built, parameters)
        _check_states_as_a_step_makes(
            optimizers[0].get("state", {}), _state_after_a_step(model, parameters)
        )
        _check_optimizer_settings(optimizers[0], type(optimizer))
        _check_settings_as_built(optimizers[0], built, SCHEDULED if scheduler is not None else ())
    if schedulers:
        _check_scheduler_state(schedulers[0], scheduler.state_dict())
        if optimizers:
            _check_rates_as_scheduled(optimizers[0], schedulers[0])
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


# the momentum a cycling schedule puts into each group's first beta (or momentum) as it goes
CYCLED_MOMENTUM = ("base_momentum", "max_momentum")


def _check_optimizer_settings(state: Mapping[str, Any], optimizer_class: type) -> None:
    """torch checks an optimizer's settings (a learning rate that is not negative, betas in
    [0, 1)...) when it is built, never when it loads a state, which brings its own settings:
    each restored group's settings, and each momentum a one-cycle schedule will set, build
    an optimizer of the same class on a weight of its own, and what it refuses is refused."""
    accepted = inspect.signature(optimizer_class).parameters
    for i, group in enumerate(state["param_groups"]):
        settings = {k: v for k, v in group.items() if k in accepted and k != "params"}
        tried = [settings]
        for name in CYCLED_MOMENTUM:
            if name in group and "betas" in settings:
                tried.append({**settings, "betas": (group[name], settings["betas"][1])})
            elif name in group and "momentum" in settings:
                tried.append({**settings, "momentum": group[name]})
        for each in tried:
            try:
                optimizer_class([torch.zeros(1, requires_grad=True)], **each)
            except (ValueError, TypeError, RuntimeError) as err:
                raise Refused(f"optimizer_states.0.param_groups.{i}", str(err)) from None


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


def _check_rates_as_scheduled(optimizer: Mapping[str, Any], scheduler: Mapping[str, Any]) -> None:
    """Under a scheduler, each group's learning rate is the one the scheduler last set
    (``_last_lr``): the first step after a resume trains at it, before the scheduler sets the
    next."""
    last = scheduler.get("_last_lr")
    if not isinstance(last, list) or len(last) != len(optimizer["param_groups"]):
        return
    for i, (group, rate) in enumerate(zip(optimizer["param_groups"], last, strict=True)):
        if group.get("lr") != rate:
            raise Refused(
                f"optimizer_states.0.param_groups.{i}.lr",
                f"is {group.get('lr')!r}, where the scheduler last set {rate!r}",
            )


# what a scheduler counts its steps in (from 0: a new scheduler has made one step, at 0)
STEP_COUNTS = ("last_epoch", "_step_count")


def _check_scheduler_state(state: Any, expected: dict) -> None:
    """A scheduler restores whatever it is given as its attributes: its settings (the phases of
    a one-cycle schedule, its anneal function...) must be the ones the model's
    ``lr_scheduler`` makes, and what it counts must be of the kind it counts."""
    state = expect_mapping(state, "lr_schedulers.0")
    like(state, expected, "lr_schedulers.0", texts=True)
    for name, value in state.items():
        if name not in SCHEDULE_PROGRESS and value != expected[name]:
            raise Refused(
                f"lr_schedulers.0.{name}",
                f"is {value!r}, where the model's scheduler has {expected[name]!r}",
            )
    for name in STEP_COUNTS:  # (a negative one runs a schedule backwards, silently)
        if name in state and type(state[name]) is int and state[name] < 0:
            raise Refused(f"lr_schedulers.0.{name}", f"{state[name]} is not a count of steps")


def _same(value: Any, reference: Any) -> bool:
    if isinstance(reference, torch.Tensor):
        return torch.equal(value, reference)
    return value == reference


# the settings of a group that a scheduler changes as it goes; the others stay as built
SCHEDULED = ("lr", "momentum", "betas")


def _check_settings_as_built(state: Any, expected: dict, scheduled: tuple[str, ...]) -> None:
    """Each group's settings are the ones the config builds the optimizer with (a resumed run's
    config is the checkpoint's), but for those a scheduler changes (``scheduled``): torch
    takes a restored ``maximize`` or momentum as it is."""
    for i, (group, reference) in enumerate(
        zip(state["param_groups"], expected["param_groups"], strict=True)
    ):
        for name, value in group.items():
            if name not in (*scheduled, "params") and not _same(value, reference[name]):
                raise Refused(
                    f"optimizer_states.0.param_groups.{i}.{name}",
                    f"is {value!r}, where the optimizer the run's config builds has "
                    f"{reference[name]!r}",
                )


def _check_optimizer_state(state: Any, expected: dict, parameters: list) -> None:
    state = expect_mapping(state, "optimizer_states.0")
    groups = expect_list(state.get("param_groups", []), "optimizer_states.0.param_groups")
    if len(groups) != len(expected["param_groups"]):
        raise Refused("optimizer_states.0.param_groups", "does not match the model's optimizer")
    for i, (group, reference) in enumerate(zip(groups, expected["param_groups"], strict=True)):
        key = f"optimizer_states.0.param_groups.{i}"
        group = expect_mapping(group, key)
        if group.get("params") != reference["params"]:
            raise Refused(f"{key}.params", "does not match the model's parameters")
        for name, value in group.items():
            if name not in reference:
                raise Refused(f"{key}.{name}", "is not a key the model's optimizer writes")
            like(value, reference[name], f"{key}.{name}")
            if isinstance(value, float) and not math.isfinite(value):
                raise Refused(f"{key}.{name}", f"{value} is not a finite number")
    for index, values in expect_mapping(state.get("state", {}), "optimizer_states.0.state").items():
        key = f"optimizer_states.0.state.{index}"
        if type(index) is not int or not 0 <= index < len(parameters):
            raise Refused(key, "names no parameter of the model")
        shape = parameters[index].shape
        for name, value in expect_mapping(values, key).items():
            if isinstance(value, torch.Tensor):
                if value.dim() and value.shape != shape:
                    raise Refused(
                        f"{key}.{name}",
                        f"has shape {tuple(value.shape)}, not the parameter's {tuple(shape)}",
                    )
            elif not plain(value):
                raise Refused(f"{key}.{name}", "is not a tensor or a number")


# states that hold averages of squares, or other amounts that cannot be negative (a negative
# one is a square root of a negative number, NaN weights, in the next step)
NOT_NEGATIVE = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta", "exp_inf")


def _state_after_a_step(model: Any, parameters: list) -> dict:
    """The state ``model.optimizer`` keeps for each of its parameters once it made a step."""
    copies = [parameter.detach().clone() for parameter in parameters]
    optimizer = model.optimizer(copies)
    for copied in copies:
        copied.grad = torch.zeros_like(copied)
    optimizer.step()
    return optimizer.state_dict()["state"]


def _check_states_as_a_step_makes(states: Mapping[int, Any], reference: Mapping[int, Any]) -> None:
    """Each parameter's state holds what the optimizer keeps after a step, each tensor of its
    dtype, finite, a step count a whole number that is not negative, and an average of
    squares not negative: torch takes any of these as they come and trains on, silently (an
    infinite average of squares stops a weight for good) or into NaN."""
    for index, values in states.items():
        key, expected = f"optimizer_states.0.state.{index}", reference.get(index, {})
        for name in expected:
            if name not in values:
                raise Refused(f"{key}.{name}", "is missing (the optimizer keeps it after a step)")
        for name, value in values.items():
            if name not in expected:
                raise Refused(f"{key}.{name}", "is not a key the model's optimizer writes")
            _check_state_value(value, expected[name], name, f"{key}.{name}")


def _check_state_value(value: Any, expected: Any, name: str, key: str) -> None:
    if isinstance(expected, torch.Tensor):
        if (
            not isinstance(value, torch.Tensor)
            or value.dtype != expected.dtype
            or value.shape != expected.shape
        ):
            raise Refused(key, f"is not a {expected.dtype} tensor of shape {tuple(expected.shape)}")
        if value.layout != torch.strided:
            raise Refused(key, f"is a {value.layout} tensor, not a dense one")
    number = value.double() if isinstance(value, torch.Tensor) else value
    if isinstance(number, torch.Tensor) and not bool(number.isfinite().all()):
        raise Refused(key, "holds NaN or infinite values")
    if name == "step" and not (
        isinstance(number, (int, float, torch.Tensor))
        and math.isfinite(float(number))
        and float(number) >= 0
        and float(number) == int(float(number))
    ):
        raise Refused(key, f"{_shown(value)} is not a count of steps")
    if name in NOT_NEGATIVE and isinstance(number, torch.Tensor) and bool((number < 0).any()):
        raise Refused(key, "holds negative values (it is an average of squares)")


def _shown(value: Any) -> str:
    """A value as a message shows it: a one-number tensor as its number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return repr(value.item())
    return repr(value)
