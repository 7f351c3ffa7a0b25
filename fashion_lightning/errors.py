"""Errors a user can cause and fix. The CLI prints them as one line and exits non-zero."""


class UserError(RuntimeError):
    """Something in the input or the environment is wrong; the message says what and how to fix it."""

    exit_code = 1


class ConfigError(UserError):
    """A config value that a library refuses when it is used (torch's optimizers...); exit 2
    like the values refused while parsing."""

    exit_code = 2


class DataError(UserError):
    """FashionMNIST cannot be found or is damaged; the message names the file and the remedy."""


class CheckpointError(UserError):
    """``--ckpt_path`` names nothing usable: missing, damaged, or a checkpoint of another model."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; training stopped before the bad step was applied."""


class TrainingInterrupted(UserError):
    """SIGINT or SIGTERM stopped training after a checkpoint of the exact state was written."""

    def __init__(self, stopped: str, signum: int, advice: str = "") -> None:
        super().__init__(f"{stopped}. {advice}" if advice else stopped)
        self.stopped = stopped  # what happened, without the advice (the search gives its own)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
