"""The command line's parser as a user meets it: what ``--help`` says beyond the docstrings of
the model's and data's arguments (the command, ``--config``'s shipped names, ``--ckpt_path``
as this project reads it, which callbacks a config may name), and its errors, one line each."""

from __future__ import annotations

import os
import re
from argparse import Action

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser

from fashion_lightning.configs import (
    ALLOWED_IMPORTS,
    refused_class_argument,
    refused_import,
    refused_weights_only,
    trusted_imports,
)
from fashion_lightning.errors import parse_error

DESCRIPTION = (
    "Train, test and use the FashionMNIST MLP of PyTorch's 'Optimizing Model Parameters' "
    "tutorial with Lightning. 'fit' alone runs the tutorial (the values of configs/sgd.yaml: "
    "10 epochs, SGD at lr 1e-3, batch 64, seed 42). Also: 'runs' compares the runs in "
    "lightning_logs/ (runs --help), and fashion-lightning-tune (python -m "
    "fashion_lightning.tune) searches hyperparameters."
)
CONFIG_HELP = (
    "A YAML config (give several to layer them): a file, or a config the package ships, by "
    "name or as configs/NAME.yaml from any folder: sgd (the tutorial, as 'fit' alone), adam, "
    "rmsprop, best (the tuned recipe), fast (the speedrun)."
)
CKPT_PATH_HELP = (
    "The checkpoint to start from: 'last' (fit: continue the newest run of this config, also "
    "from a new process; its last.ckpt), 'best' (the newest run's best checkpoint on the "
    "monitored metric), or a .ckpt file. It is read once and checked before anything runs "
    "(docs/resuming.md, docs/trust.md)."
)
# the callbacks a config can name that the project refuses (checks.check_callbacks)
REFUSED_CALLBACKS = ("lightning.pytorch.callbacks.StochasticWeightAveraging",)


def nameable(class_path: str) -> bool:
    """Whether a config may name ``class_path`` (the import policy of :mod:`.configs`)."""
    allowed = (*ALLOWED_IMPORTS, *trusted_imports())
    policy = any(class_path == entry or class_path.startswith(f"{entry}.") for entry in allowed)
    return policy and class_path not in REFUSED_CALLBACKS


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with this project's text for ``--ckpt_path`` and, as the classes
    ``--trainer.callbacks`` knows, only those a config may name (jsonargparse lists every
    subclass loaded, the project's own callbacks too, which it adds itself)."""

    def _get_help_string(self, action: Action) -> str:
        if action.dest == "ckpt_path":
            return CKPT_PATH_HELP
        text = super()._get_help_string(action)
        if action.dest == "trainer.callbacks":
            listed = re.search(r"known subclasses: ([^)]*)\)$", text)
            if listed:
                kept = [p for p in listed.group(1).split(", ") if nameable(p)]
                text = text[: listed.start(1)] + ", ".join(kept) + ")"
        return text


class OneLineErrorParser(LightningArgumentParser):
    """jsonargparse's parser, with its errors as one line: jsonargparse breaks some messages in
    two and prints the whole usage first, about 80 lines for this CLI; and the project's help
    (:mod:`.help`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # raises, as jsonargparse does inside its own parsing
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        refused = refused_import(message) or refused_weights_only(message)
        parse_error(prog, refused or refused_class_argument(message) or message)
