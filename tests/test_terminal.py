"""What a command prints: the run, not the libraries' notes that do not apply to it."""

from __future__ import annotations

import os
import warnings

import pytest

from fashion_lightning.cli import main
from fashion_lightning.terminal import results_table
from tests.helpers import RecordProgressBarMetrics, fit_args

pytestmark = pytest.mark.slow

# the tutorial's config (16 optimizer steps a call), 64 steps an epoch, train/loss every 20
PLAIN = (
    "--trainer.limit_train_batches=64",
    "--trainer.log_every_n_steps=20",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
)


def _warnings_of(*commands: list[str]) -> list[str]:
    """Run the commands in this process, as a user's first run shows warnings (each one, every
    time), and return what was warned. The tests' own call of LightningCLI with ``args`` is
    the one warning left out: a user's command line does not cause it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended")
        for command in commands:
            main(command)
    return [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.fixture
def many_cores(monkeypatch):
    """A machine with 16 cores, on which Lightning asks for loader workers (this one has 2)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)


def test_a_plain_fit_its_resume_and_an_evaluation_print_only_the_run(
    data_dir, tmp_path, capfd, caplog, many_cores
):
    RecordProgressBarMetrics.seen.clear()
    fit = fit_args(data_dir, tmp_path, *PLAIN, "--trainer.max_epochs=1")
    fit[fit.index("--trainer.enable_progress_bar=false")] = "--trainer.enable_progress_bar=true"
    watched = [*fit, "--trainer.callbacks+=tests.helpers.RecordProgressBarMetrics"]
    resumed = [*fit, "--trainer.max_epochs=2", "--ckpt_path=last"]
    validated = ["validate", *fit[1:], "--ckpt_path=best"]
    assert _warnings_of(watched, resumed, validated) == []

    out, err = capfd.readouterr()
    printed = out + err + caplog.text  # Lightning logs to pytest's handler here, not to stderr
    assert "Tip" not in printed and "litlogger" not in printed
    # the model summary: the network, its size and the run's folder, not a table of metrics
    assert "MLP 784-512-512-10, ReLU: 669,706 parameters (2.7 MB)" in printed
    assert printed.count(f"run folder: {tmp_path / 'lightning_logs' / 'sgd_0'}") == 2
    assert "MeanMetric" not in printed and "MulticlassAccuracy" not in printed
    # the results tables: the results, without the step that places them in the logs
    tables = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert {"Test", "test/acc", "Validate", "val/acc"} <= set(tables)
    assert "step" not in tables and "epoch" not in tables
    assert RecordProgressBarMetrics.seen == [["v_num", "val/acc"]]


def test_warnings_that_apply_stay(data_dir, tmp_path):
    """Ten optimizer steps an epoch with train/loss every 50 (none within the epoch), and a
    new run's checkpoints sent to a folder that holds other files."""
    folder = tmp_path / "kept"
    folder.mkdir()
    (folder / "someone-elses.ckpt").write_bytes(b"")
    few = fit_args(
        data_dir,
        tmp_path,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=10",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        f"--checkpoint.dirpath={folder}",
    )
    warned = _warnings_of(few)
    assert len(warned) == 2, warned
    assert warned[0].startswith(f"UserWarning: Checkpoint directory {folder} exists and is not")
    assert warned[1].startswith("PossibleUserWarning: The number of training batches (1) is")


def test_the_results_table_leaves_out_what_places_the_values():
    table = results_table([{"test/acc": 0.71234, "step": 860.0, "epoch": 9.0}], "test").splitlines()
    assert [line.split() for line in table[1::2]] == [
        ["Test", "metric", "DataLoader", "0"],
        ["test/acc", "0.7123"],
    ]
