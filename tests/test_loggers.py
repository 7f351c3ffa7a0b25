"""Loggers other than TensorBoard: each gets the run's hyperparameters and values, and
``runs`` reads a CSVLogger run as it reads a TensorBoard one. (MLflow is not installed here:
its ``log_hyperparams`` is the same call CSVLogger gets.)"""

from __future__ import annotations

import csv

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fashion_lightning.cli import main
from fashion_lightning.run_records import read_run
from fashion_lightning.runs import main as runs
from tests.helpers import fit_args

pytestmark = pytest.mark.slow

RUN = (
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=10",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=1",
    "--trainer.log_every_n_steps=5",
    "--model.optimizer.init_args.lr=0.05",
)


def test_a_csv_run_has_its_hyperparameters_and_runs_reads_it(data_dir, tmp_path, capsys):
    main(
        fit_args(
            data_dir,
            tmp_path,
            *RUN,
            "--trainer.logger=CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}",
        )
    )
    run = tmp_path / "lightning_logs" / "version_0"
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["data"]["batch_size"] == 64 and hparams["trainer"]["max_epochs"] == 2
    assert hparams["model"]["hidden_size"] == 512 and "optimizer" in hparams["model"]
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    validations = [float(row["val/acc"]) for row in rows if row.get("val/acc")]
    tests = [float(row["test/acc"]) for row in rows if row.get("test/acc")]
    assert len(validations) == 2 and len(tests) == 1
    assert [float(row["hp_metric"]) for row in rows if row.get("hp_metric")] == [
        validations[0],
        max(validations),
    ]

    record = read_run(run, tmp_path / "lightning_logs")
    assert (record.state, record.problem, record.epochs_done) == ("finished", "", 2)
    assert record.best_val_acc == max(validations) and record.test_acc == tests[0]
    assert record.best_epoch == 1 + validations.index(max(validations))
    assert [epoch for epoch, _ in record.curves["val/acc"]] == [1.0, 2.0]
    capsys.readouterr()
    runs(["--root", str(tmp_path / "lightning_logs")])
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:4] == ["version_0", "-", "2/2", f"{100 * max(validations):.2f}%"]


def test_every_logger_of_a_run_gets_its_hyperparameters(data_dir, tmp_path):
    loggers = [
        "--trainer.logger+=CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'csv'}",
        "--trainer.logger+=TensorBoardLogger",
        f"--trainer.logger.save_dir={tmp_path / 'tb'}",
    ]
    main(fit_args(data_dir, tmp_path, *RUN, "--trainer.max_epochs=1", *loggers))
    csv_run = tmp_path / "csv" / "lightning_logs" / "version_0"
    assert yaml.safe_load((csv_run / "hparams.yaml").read_text())["data"]["batch_size"] == 64
    tb_run = next((tmp_path / "tb" / "lightning_logs").iterdir())
    events = EventAccumulator(str(tb_run))
    events.Reload()
    assert "hp_metric" in events.Tags()["scalars"]
    # TensorBoard's HParams entry, the project's columns (the second logger of the run)
    data = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    columns = plugin_data_pb2.HParamsPluginData.FromString(data).session_start_info.hparams
    assert columns["optimizer"].string_value == "SGD" and columns["lr"].string_value == "0.05"
    assert yaml.safe_load((tb_run / "hparams.yaml").read_text())["data"]["batch_size"] == 64
