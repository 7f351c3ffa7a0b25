"""Helpers shared by the tests, and callbacks that tests name on the command line."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
SGD_CONFIG = ROOT / "configs" / "sgd.yaml"
# the tests' two sizes of a real fit: a few batches (is it accepted, what does it write), and
# two short epochs (what does training do: resumes, logged curves, several steps a call)
TINY = (
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
)
SHORT = (
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=30",
    "--trainer.limit_val_batches=5",
    "--trainer.limit_test_batches=5",
    "--trainer.log_every_n_steps=5",
    "--model.optimizer.init_args.lr=0.05",
    # one optimizer step a call: tests that stop a run at a given batch; several steps a call
    # (the configs' 16) are compared with one in tests/test_steps_per_call.py
    "--model.steps_per_call=1",
)


def fit_args(data_dir, root, *extra: str) -> list[str]:
    """``fit`` with the tutorial's config, into ``root``, quiet."""
    return [
        "fit",
        "--config",
        str(SGD_CONFIG),
        f"--data.data_dir={data_dir}",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def built_cli(*args: str):
    """The project's CLI with the model, the data and the Trainer built from ``args``, as
    ``fit`` would build them, without running anything."""
    from fashion_lightning.cli import FashionCLI
    from fashion_lightning.data import FashionMNISTDataModule
    from fashion_lightning.model import ImageClassifier

    return FashionCLI(ImageClassifier, FashionMNISTDataModule, run=False, args=list(args))


def run_cli(
    *args: str, timeout: float = 300, new_session: bool = False
) -> subprocess.CompletedProcess:
    """``python -m fashion_lightning ARGS`` in a new process, as a user runs it;
    ``new_session``: in a process group of its own, as a terminal starts a command."""
    return subprocess.run(
        [sys.executable, "-m", "fashion_lightning", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=new_session,
    )


def lines_on_a_terminal(*args: str, timeout: float = 300) -> tuple[int, list[str]]:
    """``python -m fashion_lightning ARGS`` with the progress bar on: its exit code, and the
    lines a terminal shows, where stdout (the bar) and stderr (the errors) share each line."""
    args_shown = [arg for arg in args if arg != "--trainer.enable_progress_bar=false"]
    result = subprocess.run(
        [sys.executable, "-m", "fashion_lightning", *args_shown],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return result.returncode, result.stdout.replace("\r", "\n").splitlines()


def start_cli(*args: str) -> subprocess.Popen:
    """Like :func:`run_cli`, without waiting (for tests that signal or kill it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "fashion_lightning", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def cli_in_process(args: list[str], capsys) -> tuple[int, str]:
    """``main(args)`` in this process: its exit code and what it printed to stderr, which
    holds no traceback."""
    from fashion_lightning.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


class SendSignalAt(Callback):
    """Sends a real signal to this process once, when training reaches optimizer step ``step``
    (at the start of the batch that makes that step; deterministic timing)."""

    # it follows optimizer steps (global_step), so several steps a call suit it
    steps_per_call_safe = True

    def __init__(self, signum: int, step: int) -> None:
        self.signum = signum
        self.step = step
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class SignalTheCommandAt(Callback):
    """From process 0 of a run of several processes, once, at the start of the batch that
    makes optimizer step ``step``: sends a real signal to the command's own process alone (a
    scheduler's SIGTERM to the process it started), or with ``group`` to its whole process
    group (a terminal's Ctrl+C)."""

    steps_per_call_safe = True

    def __init__(self, signum: int, step: int, group: bool = False, twice: bool = False) -> None:
        """``twice``: the same signal again 20 ms later (an impatient Ctrl+C)."""
        self.signum = signum
        self.step = step
        self.group = group
        self.twice = twice
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank != 0 or trainer.global_step < self.step or self.sent:
            return
        self.sent = True
        started_by = multiprocessing.parent_process()  # ddp_spawn: the command's process
        for _ in range(2 if self.twice else 1):
            if self.group:
                os.killpg(os.getpgid(0), self.signum)
            else:
                os.kill(started_by.pid if started_by else os.getpid(), self.signum)
            time.sleep(0.02)


class SendSignalInValidation(Callback):
    """Sends a real signal to this process at the first batch of the ``nth`` validation of a
    fit (not the sanity check), counted from 1."""

    def __init__(self, signum: int, nth: int = 1) -> None:
        self.signum = signum
        self.nth = nth
        self.seen = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking or batch_idx != 0:
            return
        self.seen += 1
        if self.seen == self.nth:
            os.kill(os.getpid(), self.signum)


class KillAt(Callback):
    """``kill -9`` of this process at the start of the batch that makes optimizer step ``step``
    (of the process of global ``rank`` only, if given)."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGKILL)


class RecordTrainOrder(Callback):
    """Writes the training indices this process will see each epoch to ``folder`` (JSON)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        indices = list(trainer.train_dataloader.sampler)
        name = f"order-rank{trainer.global_rank}-epoch{trainer.current_epoch}.json"
        Path(self.folder, name).write_text(json.dumps(indices))


class RecordLearningRate(Callback):
    """Keeps the optimizer's learning rate at every training step in ``RecordLearningRate.seen``."""

    seen: list[float] = []  # noqa: RUF012 - read by the test that runs it in this process

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        RecordLearningRate.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


class RecordCrossEntropy(Callback):
    """Keeps (epoch, plain cross-entropy, images) of every training batch, computed before its
    step with the weights that step trains, in ``RecordCrossEntropy.seen`` (one step a call)."""

    seen: list[tuple[int, float, int]] = []  # noqa: RUF012 - read by the test that runs it

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        images, labels = batch
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(pl_module(images), labels)
        RecordCrossEntropy.seen.append((trainer.current_epoch, float(loss), len(labels)))


class RecordLastCheckpoint(Callback):
    """Keeps the global step that ``last.ckpt`` holds when training reaches ``at_step``, in
    ``RecordLastCheckpoint.seen`` (None: no last.ckpt yet)."""

    seen: list[int | None] = []  # noqa: RUF012 - read by the test that runs it in this process
    steps_per_call_safe = True  # it follows optimizer steps (global_step)

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
            step = torch.load(last, weights_only=True)["global_step"] if last.exists() else None
            RecordLastCheckpoint.seen.append(step)


class RecordProgressBar(Callback):
    """Keeps (total, position) of the training progress bar at each epoch's end in
    ``RecordProgressBar.seen``."""

    seen: list[tuple[int, int]] = []  # noqa: RUF012 - read by the test that runs it in this process

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        bar = trainer.progress_bar_callback
        RecordProgressBar.seen.append((bar.total_train_batches, bar.train_progress_bar.n))


class RecordBatches(Callback):
    """A user's per-batch callback: keeps what Lightning hands it after each training batch in
    ``RecordBatches.seen``, and logs ``outputs["loss"]`` as ``probe/loss``."""

    seen: list[dict] = []  # noqa: RUF012 - read by the test that runs it in this process

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        one_batch = isinstance(batch, (tuple, list)) and isinstance(batch[0], torch.Tensor)
        RecordBatches.seen.append(
            {
                "batch_idx": batch_idx,
                "step": trainer.global_step,
                "one_batch": one_batch,
                "images": len(batch[1]) if one_batch else None,
            }
        )
        pl_module.log("probe/loss", outputs["loss"])


class NeedsAMissingPackage(Callback):
    """Fails when the run sets up, as a callback whose package is not installed does
    (Lightning's DeviceStatsMonitor without psutil)."""

    def setup(self, trainer, pl_module, stage) -> None:
        raise ModuleNotFoundError(
            "`NeedsAMissingPackage` needs `nothing_installed`: pip install it"
        )


class SendSignalInEvaluation(Callback):
    """Sends a real signal to this process at the first test or prediction batch (with
    ``group``, from process 0, to the whole process group, as a terminal's Ctrl+C)."""

    def __init__(self, signum: int, group: bool = False) -> None:
        self.signum = signum
        self.group = group

    def _send(self, trainer) -> None:
        if not self.group:
            os.kill(os.getpid(), self.signum)
        elif trainer.global_rank == 0:
            os.killpg(os.getpgid(0), self.signum)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._send(trainer)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._send(trainer)


class StopTrainingAt(Callback):
    """Sets ``trainer.should_stop`` once, at the end of the first batch (call of
    ``training_step``) after which ``step`` optimizer steps are done, or of the ``batch``-th
    batch of this process (from 1): what Lightning's Timer (``max_time``) or an early stop does
    within an epoch."""

    steps_per_call_safe = True  # it follows optimizer steps, whatever a call makes

    def __init__(self, step: int | None = None, batch: int | None = None) -> None:
        self.step = step
        self.batch = batch
        self.seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if (self.step is not None and trainer.global_step >= self.step) or self.seen == self.batch:
            trainer.should_stop = True
            self.step = self.batch = None  # once


class SlowSteps(Callback):
    """Sleeps ``seconds`` after each training batch, so that ``max_time`` lands mid-epoch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class ReadingCheckpointIO(TorchCheckpointIO):
    """A checkpoint IO a config may name, which leaves ``marker`` behind if it ever reads."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def load_checkpoint(self, *args, **kwargs):
        Path(self.marker).touch()
        return super().load_checkpoint(*args, **kwargs)


def exports(model, folder: Path) -> dict:
    """The model exported to ONNX (run by onnxruntime), by ``torch.export`` and to TorchScript,
    each as a function of a batch of uint8 images to its logits."""
    import contextlib
    import io
    import warnings

    import onnxruntime

    with contextlib.redirect_stdout(io.StringIO()):  # the ONNX exporter reports its passes
        model.to_onnx(folder / "model.onnx")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    exported = torch.export.export(
        model, (model.example_input_array,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)
    ).module()
    with warnings.catch_warnings():  # TorchScript works, and is deprecated in torch
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*to_torchscript. has been deprecated")
        scripted = model.to_torchscript()
    return {
        "onnx": lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]),
        "torch.export": exported,
        "torchscript": scripted,
    }


class RecordProgressBarMetrics(Callback):
    """Keeps the names the progress bar shows at each epoch's end in
    ``RecordProgressBarMetrics.seen``."""

    seen: list[list[str]] = []  # noqa: RUF012 - read by the test that runs it in this process

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        bar = trainer.progress_bar_callback
        RecordProgressBarMetrics.seen.append(sorted(bar.get_metrics(trainer, pl_module)))
