"""The kinds of values a checkpoint's entries may be, and the one error that refuses one.

Each check compares an entry with what this project or Lightning writes there, and says which
key is wrong and how, so that a crafted or foreign checkpoint is one line, never a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class Refused(Exception):
    """An entry that is not what this project writes: its key and what is wrong with it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")


def like(value: Any, reference: Any, key: str, counts: bool = False, texts: bool = False) -> None:
    """Refused unless ``value`` has the kind of ``reference``, a state this Lightning writes:
    mappings hold only its keys (each like its value), lists as many items, tensors the same
    dtype and shape, numbers are numbers (``counts``: whole and not negative), text is text
    (``texts``: the same text, a setting).
    A ``None`` in the reference takes a plain value or a single-number tensor."""
    if isinstance(reference, Mapping):
        value = expect_mapping(value, key)
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
    elif reference is None and not (plain(value) or is_score(value)):
        raise Refused(key, "is not a plain value")


def expect_mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise Refused(key, f"is a {type(value).__name__}, not a mapping")
    return value


def expect_list(value: Any, key: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise Refused(key, f"is a {type(value).__name__}, not a list")
    return list(value)


def expect_count(value: Any, key: str) -> None:
    if type(value) is not int or value < 0:
        raise Refused(key, f"{value!r} is not a count")


def expect_tensors(value: Any, key: str) -> None:
    """Named dense tensors as a model's ``state_dict`` holds them: weights that are numbers
    (NaN or infinity: a diverged run, nothing to continue or evaluate) and counts (a metric's
    state) that are not negative."""
    for name, tensor in expect_mapping(value, key).items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise Refused(f"{key}.{name}", "is not a named tensor")
        if tensor.layout != torch.strided:
            raise Refused(f"{key}.{name}", f"is a {tensor.layout} tensor, not a dense one")
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise Refused(f"{key}.{name}", "holds NaN or infinite values (a diverged run)")
        if (
            not tensor.is_floating_point()
            and tensor.dtype != torch.bool
            and bool((tensor < 0).any())
        ):
            raise Refused(f"{key}.{name}", "holds negative counts")


def is_score(value: Any) -> bool:
    """A monitored value as ``ModelCheckpoint`` keeps it: one number, never NaN (it keeps a NaN
    score as the worst infinity)."""
    if isinstance(value, torch.Tensor):  # a metric's value (an int for monitor=epoch)
        return value.numel() == 1 and value.dtype != torch.bool and not bool(value.isnan().any())
    return type(value) in (int, float) and value == value


def is_bytes(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
