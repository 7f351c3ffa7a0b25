"""Several optimizer steps in one call of ``training_step`` (``model.steps_per_call``): the same
batches, steps, weights, logged values and checkpoints as one step a call, only faster."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import (
    DeviceStatsMonitor,
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    RichProgressBar,
    Timer,
    TQDMProgressBar,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fashion_lightning.cli import main
from fashion_lightning.progress import StepProgressBar
from fashion_lightning.resume import ResumableTraining
from fashion_lightning.run_checkpoints import RunCheckpoint
from fashion_lightning.steps import per_batch_callbacks
from tests.helpers import (
    SHORT,
    RecordBatches,
    RecordLastCheckpoint,
    SendSignalAt,
    fit_args,
    run_cli,
)

pytestmark = pytest.mark.slow

# the tutorial's run, short, with every per-step feature on: dropout (random masks), flipped
# images (drawn per step), a learning rate stepped every step, a weight average
RUN = (
    *SHORT,
    "--model.dropout=0.2",
    "--data.augment_flip=true",
    "--model.lr_scheduler=StepLR",
    "--model.lr_scheduler.init_args.step_size=7",
    "--model.lr_scheduler.init_args.gamma=0.9",
    "--model.scheduler_interval=step",
    "--trainer.callbacks+=EMAWeightAveraging",
    "--trainer.callbacks.decay=0.9",
)


def _last(root: Path) -> dict:
    return torch.load(
        root / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt", weights_only=True
    )


def _scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(root / "lightning_logs" / "sgd_0"))
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def assert_same_run(expected: Path, got: Path) -> None:
    """Bit-identical weights (raw and averaged), optimizer and scheduler state, where the
    epoch's order stands, and every logged value at the same step."""
    a, b = _last(expected), _last(got)
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "current_model_state"):  # the second with a weight average
        for name, tensor in a.get(key, {}).items():
            assert torch.equal(b[key][name], tensor), (key, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    states = (a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"])
    assert states[0].keys() == states[1].keys()
    resumable = [
        {k: v for k, v in c["callbacks"]["ResumableTraining"].items() if k != "rng"} for c in (a, b)
    ]
    assert resumable[0] == resumable[1]
    assert _scalars(expected) == _scalars(got)


@pytest.fixture(scope="module")
def one_step_a_call(data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("k1")
    main(fit_args(data_dir, root, *RUN))
    return root


@pytest.mark.parametrize("steps", [4, 7])
def test_several_steps_a_call_are_the_same_run(steps, one_step_a_call, data_dir, tmp_path):
    main(fit_args(data_dir, tmp_path, *RUN, f"--model.steps_per_call={steps}"))
    assert_same_run(one_step_a_call, tmp_path)
    assert _last(tmp_path)["global_step"] == 60  # optimizer steps, not calls


def test_step_checkpoints_and_max_steps_count_optimizer_steps(data_dir, tmp_path):
    RecordLastCheckpoint.seen.clear()
    args = (
        *RUN,
        "--model.steps_per_call=4",
        "--checkpoint.every_n_train_steps=7",
        "--trainer.max_steps=45",
        "--trainer.callbacks+=tests.helpers.RecordLastCheckpoint",
        "--trainer.callbacks.at_step=20",
    )
    main(fit_args(data_dir, tmp_path, *args))
    # every 7 steps: with 4 steps a call, at the end of the call with step 14 (steps 13-16)
    assert RecordLastCheckpoint.seen == [16]
    assert _last(tmp_path)["global_step"] == 45  # stopped inside a call, at max_steps
    expected = tmp_path / "one-step"
    main(fit_args(data_dir, expected, *args[:-2], "--model.steps_per_call=1"))
    assert_same_run(expected, tmp_path)


def test_the_progress_bar_counts_optimizer_steps(data_dir, tmp_path):
    from tests.helpers import RecordProgressBar

    RecordProgressBar.seen.clear()
    main(
        fit_args(
            data_dir,
            tmp_path,
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=30",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=1",
            "--trainer.enable_progress_bar=true",
            "--model.steps_per_call=4",
            "--trainer.callbacks+=tests.helpers.RecordProgressBar",
        )
    )
    assert RecordProgressBar.seen == [(30, 30), (30, 30)]  # total and position, in steps


def test_callbacks_that_follow_batches_get_one_a_call_and_the_others_keep_several():
    need_one = per_batch_callbacks(
        [
            LearningRateMonitor(),
            DeviceStatsMonitor(),
            RichProgressBar.__new__(RichProgressBar),  # its hooks decide (rich: not installed)
            TQDMProgressBar(),
            ModelCheckpoint(every_n_train_steps=5),  # a multiple of 5 can fall inside a call
            RecordBatches(),  # a user's callback with on_train_batch_end
        ]
    )
    assert need_one == [
        "LearningRateMonitor",
        "DeviceStatsMonitor",
        "RichProgressBar",
        "TQDMProgressBar",
        "ModelCheckpoint",
        "RecordBatches",
    ]
    keep_several = [
        EarlyStopping(monitor="val/loss"),
        EMAWeightAveraging(),
        ModelCheckpoint(monitor="val/loss"),
        RunCheckpoint(every_n_train_steps=5),  # the project's: counts optimizer steps
        StepProgressBar(),
        ResumableTraining(),
        Timer(duration="00:01:00:00"),
        ModelSummary(),
        SendSignalAt(2, 10),  # a user's callback that says it follows optimizer steps
    ]
    assert per_batch_callbacks(keep_several) == []


def test_a_per_batch_callback_and_learning_rate_monitor_see_one_batch_at_the_projects_steps(
    data_dir, tmp_path, capsys
):
    RecordBatches.seen.clear()
    main(
        fit_args(  # configs/sgd.yaml: 16 optimizer steps a call
            data_dir,
            tmp_path,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=20",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=1",
            "--trainer.log_every_n_steps=5",
            "--trainer.callbacks+=LearningRateMonitor",
            "--trainer.callbacks.logging_interval=step",
            "--trainer.callbacks+=tests.helpers.RecordBatches",
        )
    )
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: --model.steps_per_call 16: this run makes 1 optimizer step a call "
        "(LearningRateMonitor, RecordBatches expect one batch a call); the result is the same"
    ]
    seen = RecordBatches.seen
    assert [s["batch_idx"] for s in seen] == list(range(20))  # batches, not groups of 16
    assert all(s["one_batch"] and s["images"] == 64 for s in seen)
    assert [s["step"] for s in seen] == list(range(1, 21))  # one optimizer step each
    scalars = _scalars(tmp_path)
    # outputs["loss"] is the batch's loss: what the callback logs lands at the steps of the
    # project's train/loss, with its values; the learning rate where train/lr is
    assert [step for step, _ in scalars["train/loss"]] == [4, 9, 14, 19]
    assert scalars["probe/loss"] == scalars["train/loss"]
    assert scalars["lr-SGD"] == scalars["train/lr"]
    assert [step for step, _ in scalars["val/acc"]] == [20]  # the same axis: optimizer steps


def _stop(data_dir, root, steps: int, step: int) -> int:
    """Stop a run by SIGINT from optimizer step ``step`` on; the step it stopped at."""
    stopped = run_cli(
        *fit_args(data_dir, root, *RUN, f"--model.steps_per_call={steps}"),
        "--trainer.callbacks+=tests.helpers.SendSignalAt",
        f"--trainer.callbacks.signum={int(signal.SIGINT)}",
        f"--trainer.callbacks.step={step}",
    )
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    return _last(root)["global_step"]


def _resume(data_dir, root, steps: int):
    return run_cli(
        *fit_args(data_dir, root, *RUN, f"--model.steps_per_call={steps}"), "--ckpt_path=last"
    )


@pytest.mark.parametrize(("stopped_with", "resumed_with"), [(4, 4)])
def test_a_stop_in_the_middle_of_an_epoch_resumes_exactly(
    stopped_with, resumed_with, one_step_a_call, data_dir, tmp_path
):
    step = _stop(data_dir, tmp_path, stopped_with, 35)
    # the signal lands at the start of the first call from step 35 on; the run stops at its end
    assert 35 < step <= 35 + 2 * stopped_with
    resumed = _resume(data_dir, tmp_path, resumed_with)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(one_step_a_call, tmp_path)


@pytest.mark.parametrize(("stopped_with", "resumed_with", "last_call"), [(1, 7, 29)])
def test_a_stop_at_an_epochs_end_resumes_exactly_with_another_number_of_steps_a_call(
    stopped_with, resumed_with, last_call, one_step_a_call, data_dir, tmp_path
):
    # the signal at the epoch's last call: the epoch ends (validation...), then the run stops
    assert _stop(data_dir, tmp_path, stopped_with, last_call) == 30
    resumed = _resume(data_dir, tmp_path, resumed_with)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(one_step_a_call, tmp_path)


def test_a_stop_in_the_middle_of_an_epoch_continues_it_as_it_began(
    one_step_a_call, data_dir, tmp_path
):
    _stop(data_dir, tmp_path, 4, 35)
    # a callback that needs one batch a call cannot join the stopped epoch: one line, nothing lost
    refused = run_cli(
        *fit_args(data_dir, tmp_path, *RUN, "--model.steps_per_call=7"),
        "--ckpt_path=last",
        "--trainer.callbacks+=LearningRateMonitor",
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --ckpt_path ")
    assert "LearningRateMonitor need one batch a call" in refused.stderr
    resumed = _resume(data_dir, tmp_path, 7)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "note: --model.steps_per_call 7: this run makes 4 optimizer steps a call (the stopped "
        "epoch continues as it began); the result is the same" in resumed.stderr
    )
    assert_same_run(one_step_a_call, tmp_path)


def test_a_nan_loss_names_its_step_and_writes_no_nan_weights(data_dir, tmp_path, capsys):
    def nan_step(steps: int) -> int:
        args = fit_args(
            data_dir,
            tmp_path / str(steps),
            f"--model.steps_per_call={steps}",
            "--model.optimizer.init_args.lr=1e6",
            "--checkpoint.every_n_train_steps=1",
            "--checkpoint.monitor=null",
        )
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 1
        line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")][-1]
        last = tmp_path / str(steps) / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"
        if last.exists():  # written at the end of a call before the bad one: finite
            checkpoint = torch.load(last, weights_only=True)
            assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
        else:
            assert "no checkpoint was written yet" in line
        return int(line.split(" at step ")[1].split()[0])

    assert nan_step(4) == nan_step(1)  # the same bad step, named the same


@pytest.mark.parametrize(
    ("option", "why"),
    [
        ("--trainer.val_check_interval=0.5", "a validation within an epoch"),
        ("--trainer.accumulate_grad_batches=2", "gradient accumulation and clipping"),
    ],
)
def test_what_needs_one_step_a_call_gets_it_and_says_so(option, why, data_dir, tmp_path, capsys):
    args = (
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=12",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=1",
        option,
    )
    main(fit_args(data_dir, tmp_path / "one", *args, "--model.steps_per_call=1"))
    main(fit_args(data_dir, tmp_path / "four", *args, "--model.steps_per_call=4"))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1
    assert notes[0].startswith("note: --model.steps_per_call 4: this run makes 1 optimizer step")
    assert why in notes[0] and notes[0].endswith("the result is the same")
    assert_same_run(tmp_path / "one", tmp_path / "four")


def test_bf16_mixed_precision_gives_the_same_run(data_dir, tmp_path):
    args = (
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=12",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=1",
        "--trainer.precision=bf16-mixed",
    )
    main(fit_args(data_dir, tmp_path / "one", *args))
    main(fit_args(data_dir, tmp_path / "four", *args, "--model.steps_per_call=4"))
    a, b = _last(tmp_path / "one"), _last(tmp_path / "four")
    for name, tensor in a["state_dict"].items():
        assert torch.equal(b["state_dict"][name], tensor), name
