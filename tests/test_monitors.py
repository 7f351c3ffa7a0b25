"""What callbacks may monitor: the model's metrics, by name. A typo is one line before any
training; ``step`` and ``epoch``, which the model logs for the loggers' x-axis, are no metric."""

from __future__ import annotations

import pytest

from fashion_lightning.cli import main, run
from fashion_lightning.model import ImageClassifier
from tests.helpers import TINY, fit_args


def test_a_monitor_typo_is_one_line_before_training_and_leaves_no_run_folder(
    data_dir, tmp_path, capsys
):
    args = fit_args(
        data_dir,
        tmp_path,
        "--trainer.callbacks+=EarlyStopping",
        "--trainer.callbacks.monitor=val/los",
    )
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        "error: EarlyStopping's monitor val/los: the run reports no metric of that name; it "
        "reports val/acc, val/loss, val/acc_class/{T-shirt_top,"
    )
    assert "step" not in line.split("it reports")[1] and "epoch" not in line
    runs = tmp_path / "lightning_logs"
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.slow
def test_callback_metrics_hold_the_models_metrics_alone(data_dir, tmp_path):
    cli = run(
        fit_args(data_dir, tmp_path, *TINY, "--trainer.log_every_n_steps=1"), test_after_fit=False
    )
    assert set(cli.trainer.callback_metrics) == set(ImageClassifier.monitorable_metrics())
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert not {"step", "epoch"} & set(cli.trainer.callback_metrics)
    assert "test/acc" in cli.trainer.callback_metrics
