"""What ``--help`` says beyond the docstrings of the model's and data's arguments: the command,
``--config``'s shipped names, ``--ckpt_path`` as this project reads it, and which callbacks a
config may name."""

from __future__ import annotations

import re
from argparse import Action

from jsonargparse import DefaultHelpFormatter

from fashion_lightning.configs import ALLOWED_IMPORTS, trusted_imports

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
    "rmsprop, best."
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
