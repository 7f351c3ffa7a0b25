"""Learning-rate schedules that follow a metric: ReduceLROnPlateau, torch's and Lightning's,
in the project's loop and in Lightning's; refused in one line where it cannot work."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fashion_lightning.cli import main
from tests.helpers import fit_args

# a learning rate too small to move val/loss by the plateau's threshold (1e-4, relative), large
# enough that half of it is a change torch makes (more than its eps, 1e-8): each
# epoch after the first is a plateau, and patience 0 halves the rate at once
PLATEAU = (
    "--trainer.max_epochs=3",
    "--trainer.limit_train_batches=5",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=1",
    "--trainer.log_every_n_steps=1",
    "--model.optimizer.init_args.lr=1e-6",
    "--model.lr_scheduler.init_args.patience=0",
    "--model.lr_scheduler.init_args.factor=0.5",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheduler",
    [
        # torch's, following the default monitor val/loss, 16 steps a call (configs/sgd.yaml)
        ["--model.lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau"],
        # Lightning's, which names its monitor, here an accuracy (mode max)
        [
            "--model.lr_scheduler=lightning.pytorch.cli.ReduceLROnPlateau",
            "--model.lr_scheduler.monitor=val/acc",
            "--model.lr_scheduler.mode=max",
        ],
        # in Lightning's own loop (gradient clipping), which steps it itself
        [
            "--model.lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau",
            "--trainer.gradient_clip_val=10",
        ],
    ],
    ids=["torch-val_loss", "lightning-val_acc", "lightnings-loop"],
)
def test_a_plateau_halves_the_learning_rate_after_each_flat_epoch(scheduler, data_dir, tmp_path):
    main(fit_args(data_dir, tmp_path, *scheduler, *PLATEAU))
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "sgd_0"))
    events.Reload()
    rates = [event.value for event in events.Scalars("train/lr")]
    # 3 epochs of 5 steps: the third, after the plateau of the second, at half the rate
    assert rates == pytest.approx([1e-6] * 10 + [5e-7] * 5, rel=1e-6)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (
            ["--model.scheduler_monitor=val/los"],
            "error: --model.scheduler_monitor val/los: the run reports no metric of that name; "
            "it reports val/acc, val/loss, val/acc_class/",
        ),
        (
            ["--model.scheduler_interval=step"],
            "error: --model.scheduler_interval step: ReduceLROnPlateau follows a metric measured "
            "once an epoch; use --model.scheduler_interval epoch",
        ),
    ],
    ids=["monitor-typo", "every-step"],
)
def test_a_plateau_scheduler_that_cannot_work_is_one_line_before_training(
    options, error, data_dir, tmp_path, capsys
):
    args = fit_args(
        data_dir,
        tmp_path,
        "--model.lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau",
        *options,
    )
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(error)
    assert not (tmp_path / "lightning_logs").exists() or not any(
        (tmp_path / "lightning_logs").iterdir()
    )


@pytest.mark.parametrize(
    "named",
    ["lightning.pytorch.cli.LightningCLI", "lightning.pytorch.cli.SaveConfigCallback"],
)
def test_only_lightnings_plateau_scheduler_may_be_named_of_its_cli_module(named, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--trainer.default_root_dir={tmp_path}", f"--model.lr_scheduler={named}"])
    assert exit_.value.code == 2
    assert f"'{named}' may not be named in a config" in capsys.readouterr().err
