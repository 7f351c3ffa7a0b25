"""Lightning's Trainer, with the types of its batch limits as Lightning documents them.

Lightning annotates ``limit_train_batches`` and the like ``Optional[Union[int, float]]``: a
whole number counts batches, a float is a fraction of them. By the time the CLI reads the
annotation it is ``Union[float, int]`` (typing hands back an equal union that was built
earlier, in another order), and jsonargparse tries float first: ``--trainer.limit_train_batches
1``, one batch, became 1.0, the whole epoch (Lightning issue #21259). Here each limit is a
whole number of batches first, then a fraction.
"""

from __future__ import annotations

from typing import Any

from jsonargparse.typing import NonNegativeFloat, register_type
from lightning.pytorch import Trainer


class Batches(int):
    """A whole number of batches, never a float: jsonargparse's own whole-number types take
    1.0 for 1, and a config saved and read again would turn the whole epoch into one batch."""

    def __new__(cls, value: Any) -> Batches:
        if isinstance(value, str) and value.strip().isdigit():  # from the command line
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{value!r} is not a whole number of batches")
        return super().__new__(cls, value)


def _batches_in_a_config(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not a whole number of batches")  # (a fraction: next)
    return int(value)


register_type(Batches, serializer=_batches_in_a_config, deserializer=Batches)

BatchLimit = Batches | NonNegativeFloat | None  # whole numbers first: an int is batches


class FashionTrainer(Trainer):
    """Lightning's Trainer; only its batch limits are read another way (see the module)."""

    def __init__(
        self,
        *,
        limit_train_batches: BatchLimit = None,
        limit_val_batches: BatchLimit = None,
        limit_test_batches: BatchLimit = None,
        limit_predict_batches: BatchLimit = None,
        overfit_batches: Batches | NonNegativeFloat = 0.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            limit_train_batches: How much of the training data an epoch uses: a whole number
                of batches (1: one batch) or a fraction (0.25; 1.0: all). Default: all.
            limit_val_batches: How much of the validation data each validation uses: batches
                or a fraction, as ``limit_train_batches``. Default: all.
            limit_test_batches: How much of the test split a test uses: batches or a fraction.
                Default: all.
            limit_predict_batches: How much of the data ``predict`` classifies: batches or a
                fraction. Default: all.
            overfit_batches: Train, validate and test on this many training batches (or this
                fraction of them), to check that the model can overfit them; 0: off.
        """
        super().__init__(
            limit_train_batches=_plain(limit_train_batches),
            limit_val_batches=_plain(limit_val_batches),
            limit_test_batches=_plain(limit_test_batches),
            limit_predict_batches=_plain(limit_predict_batches),
            overfit_batches=_plain(overfit_batches),
            **kwargs,
        )


def _plain(limit: int | float | None) -> int | float | None:
    """A limit as the int or float Lightning checks for (not jsonargparse's restricted kinds)."""
    if limit is None or isinstance(limit, bool):
        return limit
    return int(limit) if isinstance(limit, int) else float(limit)
