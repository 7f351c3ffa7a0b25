"""Run folders and the checkpoints in them: each run its own folder, `last` and `best` find the
right file, `last.ckpt` is the latest state, and a resume keeps the model it was trained with."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fashion_lightning.cli import main
from fashion_lightning.run_folders import RunFolderLogger, continued_logger
from tests.helpers import ROOT, RecordLastCheckpoint, built_cli, fit_args, last_line, run_cli

pytestmark = pytest.mark.slow

TINY = (
    "--trainer.limit_train_batches=10",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
)


def _error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def _load(path):
    return torch.load(path, weights_only=True)


def test_loggers_created_together_claim_different_folders(tmp_path):
    claiming = [RunFolderLogger(tmp_path / "runs", run_name="sgd") for _ in range(3)]
    claiming += [RunFolderLogger(tmp_path / "runs") for _ in range(2)]
    assert [logger.version for logger in claiming] == ["sgd_0", "sgd_1", "sgd_2", 0, 1]
    assert sorted(p.name for p in (tmp_path / "runs" / "lightning_logs").iterdir()) == [
        "sgd_0",
        "sgd_1",
        "sgd_2",
        "version_0",
        "version_1",
    ]


def test_a_resume_does_not_draw_an_epoch_twice(tmp_path):
    """A run killed after it drew an epoch's validation and before that epoch's checkpoint
    resumes from the epoch before: the values it writes again are drawn once."""
    first = RunFolderLogger(tmp_path, run_name="sgd")
    for epoch, step in ((0, 10), (1, 20)):  # what Lightning hands the logger at epoch ends
        first.log_metrics({"val/acc": 0.5 + epoch / 10, "epoch": float(epoch)}, step)
    first.finalize("success")
    run_dir = tmp_path / "lightning_logs" / "sgd_0"
    resumed = continued_logger(RunFolderLogger(tmp_path), run_dir, last_step=10)
    for epoch, step in ((1, 20), (2, 30)):  # epoch 1 again, as the checkpoint of step 10 goes
        resumed.log_metrics({"val/acc": 0.5 + epoch / 10, "epoch": float(epoch)}, step)
    resumed.finalize("success")
    events = EventAccumulator(str(run_dir))
    events.Reload()
    drawn = [(e.step, round(e.value, 6)) for e in events.Scalars("epoch/acc_val")]
    assert drawn == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert [e.step for e in events.Scalars("val/acc")] == [10, 20, 30]  # purge_step's part


def test_runs_started_together_each_get_their_own_folder(data_dir, tmp_path):
    args = fit_args(data_dir, tmp_path, "--trainer.max_epochs=1", *TINY)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "fashion_lightning", *args, f"--data.seed={seed}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2, 3)
    ]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    runs = sorted((tmp_path / "lightning_logs").iterdir())
    assert [run.name for run in runs] == ["sgd_0", "sgd_1", "sgd_2"]
    seeds = set()
    for run in runs:
        files = sorted(p.name for p in run.iterdir())
        assert files.count("config.yaml") == 1 and "config-2.yaml" not in files, files
        writers = {p.name.split(".")[-2] for p in run.glob("events.out.tfevents.*")}
        assert len(writers) == 1  # one process wrote here
        assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "last.ckpt"
        seeds.add(
            next(ln for ln in (run / "config.yaml").read_text().splitlines() if "  seed:" in ln)
        )
    assert len(seeds) == 3


def test_last_ckpt_is_the_latest_epoch_whatever_the_monitor_says(data_dir, tmp_path):
    # mode=min on val/acc: the best checkpoint is the first epoch's, the last must be the third's
    main(fit_args(data_dir, tmp_path, "--trainer.max_epochs=3", "--checkpoint.mode=min", *TINY))
    folder = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints"
    best = [p for p in folder.iterdir() if p.name != "last.ckpt"]
    assert [p.name[:7] for p in best] == ["epoch01"]  # epochs count from 1, as in the table
    last = _load(folder / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 30)


def test_fast_dev_run_writes_no_checkpoint(data_dir, tmp_path):
    main(fit_args(data_dir, tmp_path, "--trainer.fast_dev_run=2"))
    assert list(tmp_path.rglob("*.ckpt")) == []


def test_last_takes_the_newest_run_when_runs_share_a_folder(data_dir, tmp_path, capsys):
    # without a logger every run writes into <root>/checkpoints: the second run's is last-v1.ckpt
    no_logger = ("--trainer.logger=false", "--trainer.max_epochs=1", *TINY)
    main(fit_args(data_dir, tmp_path, *no_logger))
    main(fit_args(data_dir, tmp_path, *no_logger, "--data.seed=7"))
    folder = tmp_path / "checkpoints"
    first, second = _load(folder / "last.ckpt"), _load(folder / "last-v1.ckpt")
    assert not torch.equal(
        first["state_dict"]["model.linear_relu_stack.0.weight"],
        second["state_dict"]["model.linear_relu_stack.0.weight"],
    )
    resume = ("--trainer.max_epochs=2", "--ckpt_path=last")
    main(fit_args(data_dir, tmp_path, *no_logger, "--data.seed=7", *resume))
    assert _load(folder / "last-v1.ckpt")["global_step"] == 20  # the second run went on
    assert _load(folder / "last.ckpt")["global_step"] == 10  # the first is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".yaml") == [
        "config-2.yaml",
        "config-3.yaml",
        "config.yaml",
    ]


@pytest.fixture(scope="module")
def two_epoch_run(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-epochs")
    main(
        fit_args(
            data_dir,
            root,
            "--trainer.max_epochs=2",
            "--checkpoint.save_top_k=2",
            "--model.optimizer.init_args.lr=0.05",
            *TINY,
        )
    )
    return root


def _test_acc(root, version: str) -> float:
    events = EventAccumulator(str(root / "lightning_logs" / version))
    events.Reload()
    return events.Scalars("test/acc")[-1].value


def test_best_in_a_new_process_is_the_newest_runs_best_checkpoint(two_epoch_run, data_dir, capsys):
    run = two_epoch_run / "lightning_logs" / "sgd_0" / "checkpoints"
    best = _load(run / "last.ckpt")["callbacks"]
    best = next(state["best_model_path"] for key, state in best.items() if "Checkpoint" in key)
    assert len(list(run.glob("epoch*.ckpt"))) == 2  # the best is one of two

    test = ["test", *fit_args(data_dir, two_epoch_run, *TINY)[1:]]
    main([*test, "--ckpt_path=best"])
    main([*test, f"--ckpt_path={best}"])
    runs = sorted(p.name for p in (two_epoch_run / "lightning_logs").iterdir())
    assert runs == ["sgd_0", "sgd_1", "sgd_2"]
    assert _test_acc(two_epoch_run, "sgd_1") == _test_acc(two_epoch_run, "sgd_2")


def test_best_with_no_run_is_one_line(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["test", *fit_args(data_dir, tmp_path)[1:], "--ckpt_path=best"])
    assert exit_.value.code == 1
    line = _error_line(capsys)
    assert line.startswith("error: --ckpt_path best: no last.ckpt under ")
    assert line.endswith("pass a checkpoint file to --ckpt_path")


def test_resume_refuses_model_values_that_differ_from_the_checkpoint(
    two_epoch_run, data_dir, tmp_path, capsys
):
    checkpoint = two_epoch_run / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"
    before = checkpoint.read_bytes()
    args = fit_args(data_dir, tmp_path, *TINY, f"--ckpt_path={checkpoint}")
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--model.hidden_size=256", "--model.optimizer.init_args.lr=0.05"])
    assert exit_.value.code == 1
    line = _error_line(capsys)
    assert line.startswith(
        f"error: --ckpt_path {checkpoint}: the checkpoint was trained with model.hidden_size 512 "
        "(asked: 256); a resumed run keeps its model"
    )
    assert f"--config {checkpoint.parent.parent / 'config.yaml'}" in line
    assert checkpoint.read_bytes() == before
    assert not (tmp_path / "lightning_logs").exists()


def test_evaluation_takes_the_checkpoints_model_and_says_so(
    two_epoch_run, data_dir, tmp_path, capsys
):
    checkpoint = two_epoch_run / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"
    main(
        [
            "test",
            *fit_args(data_dir, tmp_path, *TINY)[1:],
            f"--ckpt_path={checkpoint}",
            "--model.hidden_size=256",
        ]
    )
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: test uses the checkpoint's model.hidden_size 512 (asked: 256), "
        "model.optimizer.init_args.lr 0.05 (asked: 0.001)"
    ]
    config = (tmp_path / "lightning_logs" / "sgd_0" / "config.yaml").read_text()
    assert "hidden_size: 512" in config


def test_step_saves_write_the_last_checkpoint_and_the_best_is_a_validated_one(data_dir, tmp_path):
    RecordLastCheckpoint.seen.clear()
    main(
        fit_args(
            data_dir,
            tmp_path,
            "--trainer.max_epochs=2",
            *TINY,
            "--checkpoint.every_n_train_steps=3",
            "--model.steps_per_call=1",  # a checkpoint at step 3, not at the end of a call
            "--trainer.callbacks+=tests.helpers.RecordLastCheckpoint",
            "--trainer.callbacks.at_step=4",
        )
    )
    assert RecordLastCheckpoint.seen == [3]  # written at step 3, before any validation
    folder = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints"
    best = [p for p in folder.iterdir() if p.name.startswith("epoch")]
    assert len(best) == 1
    # the best is a state that validation measured: the end of an epoch (step 10 or 20)
    assert _load(best[0])["global_step"] in (10, 20)
    assert _load(folder / "last.ckpt")["global_step"] == 20


def test_a_resume_that_spells_the_folder_differently_keeps_writing_the_same_last_ckpt(
    data_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = fit_args(data_dir, tmp_path, "--trainer.max_epochs=1", *TINY)
    main(args)
    main([*args, "--trainer.default_root_dir=.", "--trainer.max_epochs=2", "--ckpt_path=last"])
    folder = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints"
    assert sorted(p.name for p in folder.glob("last*")) == ["last.ckpt"]
    assert _load(folder / "last.ckpt")["global_step"] == 20


@pytest.mark.parametrize(
    ("extra", "shown"),
    [
        (
            ["--model.lr_scheduler=StepLR", "--model.lr_scheduler.init_args.step_size=1"],
            "model.lr_scheduler none (asked: torch.optim.lr_scheduler.StepLR)",
        ),
        (["--data.batch_size=128"], "data.batch_size 64 (asked: 128)"),
        (["--data.seed=7"], "data.seed 42 (asked: 7)"),
    ],
    ids=["scheduler-added", "batch-size", "data-seed"],
)
def test_resume_refuses_a_scheduler_or_training_order_the_checkpoint_lacks(
    extra, shown, two_epoch_run, data_dir, tmp_path, capsys
):
    checkpoint = two_epoch_run / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"
    args = fit_args(
        data_dir,
        tmp_path,
        *TINY,
        "--model.optimizer.init_args.lr=0.05",
        f"--ckpt_path={checkpoint}",
    )
    with pytest.raises(SystemExit):
        main([*args, *extra])
    assert f"the checkpoint was trained with {shown}; a resumed run keeps" in _error_line(capsys)


def test_resuming_a_one_cycle_run_past_its_schedule_is_one_line(data_dir, tmp_path, capsys):
    best = ["--config", str(ROOT / "configs" / "best.yaml"), *TINY]
    main(fit_args(data_dir, tmp_path, *best, "--trainer.max_epochs=1"))
    last = tmp_path / "lightning_logs" / "sgd+best_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(data_dir, tmp_path, *best, "--trainer.max_epochs=2", "--ckpt_path=last"))
    assert exit_.value.code == 1
    assert _error_line(capsys).startswith(
        "error: the learning-rate schedule (OneCycleLR) spans 10 steps but this run trains 20"
    )
    assert last.read_bytes() == before


def test_a_tensorboard_logger_named_in_the_config_claims_its_folder_too(tmp_path):
    cli = built_cli(
        "--config",
        str(ROOT / "configs" / "sgd.yaml"),
        "--trainer.logger=TensorBoardLogger",
        f"--trainer.logger.save_dir={tmp_path}",
    )
    assert isinstance(cli.trainer.logger, RunFolderLogger)


def test_resume_with_a_csv_logger_continues_its_folder(data_dir, tmp_path):
    logger = ("--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}", *TINY)
    main(fit_args(data_dir, tmp_path, *logger, "--trainer.max_epochs=1"))
    main(fit_args(data_dir, tmp_path, *logger, "--trainer.max_epochs=2", "--ckpt_path=last"))
    runs = sorted(p.name for p in (tmp_path / "lightning_logs").iterdir())
    assert runs == ["version_0"]  # a logger named in the config keeps Lightning's names
    with (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    validated_at = [int(row["step"]) for row in rows if row.get("val/acc")]
    assert validated_at == [10, 20]  # the first command's epoch is kept, the second's added


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143)])
def test_a_signal_during_test_stops_with_its_exit_code_and_one_line(
    signum, code, two_epoch_run, data_dir, tmp_path
):
    checkpoint = two_epoch_run / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"
    result = run_cli(
        "test",
        *fit_args(data_dir, tmp_path, *TINY, "--model.optimizer.init_args.lr=0.05")[1:],
        f"--ckpt_path={checkpoint}",
        "--trainer.callbacks+=tests.helpers.SendSignalInEvaluation",
        f"--trainer.callbacks.signum={int(signum)}",
    )
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    name = signal.Signals(signum).name
    assert last_line(result.stderr) == f"error: stopped by {name}; nothing was saved"
    assert not (tmp_path / "lightning_logs").exists()  # no folder `runs` would call failed
