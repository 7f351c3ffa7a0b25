"""Runs survive being stopped: exact resume in a new process, signals, kill -9."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fashion_lightning.checkpoints import CROSS_ENTROPY_KEY
from fashion_lightning.cli import main
from fashion_lightning.run_records import read_run
from tests.helpers import SHORT, fit_args, last_line, run_cli, start_cli

pytestmark = pytest.mark.slow

COMPARED_SCALARS = ("train/loss", "train/acc", "train/cross_entropy", "val/loss", "val/acc")


def _run_dir(root: Path) -> Path:
    runs = sorted((root / "lightning_logs").iterdir())
    assert [run.name for run in runs] == ["sgd_0"], "a resumed run must keep its folder"
    return runs[0]


def _final_state(root: Path) -> dict:
    return torch.load(_run_dir(root) / "checkpoints" / "last.ckpt", weights_only=False)


def _scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(_run_dir(root)))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def assert_same_weights(expected_root: Path, resumed_root: Path) -> None:
    """Bit-identical final weights, after as many optimizer steps."""
    expected, resumed = _final_state(expected_root), _final_state(resumed_root)
    assert resumed["global_step"] == expected["global_step"]
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name


def assert_same_run(expected_root: Path, resumed_root: Path) -> None:
    """Bit-identical final weights and optimizer state, and the same logged curves."""
    assert_same_weights(expected_root, resumed_root)
    expected_curves, resumed_curves = _scalars(expected_root), _scalars(resumed_root)
    for tag in COMPARED_SCALARS:
        assert resumed_curves[tag] == expected_curves[tag], tag
    assert resumed_curves["test/acc"][-1] == expected_curves["test/acc"][-1]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    main(fit_args(data_dir, root, *SHORT))
    return root


def test_resume_at_epoch_boundary_in_new_process_is_exact(data_dir, tmp_path, uninterrupted):
    main(fit_args(data_dir, tmp_path, *SHORT, "--trainer.max_epochs=1"))
    # as checkpoints were before they kept the epoch's training cross-entropy: they resume too
    last = _run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    del checkpoint[CROSS_ENTROPY_KEY]
    torch.save(checkpoint, last)
    # a new process: nothing but the checkpoint carries over
    resumed = run_cli(*fit_args(data_dir, tmp_path, *SHORT, "--ckpt_path=last"))
    assert resumed.returncode == 0, resumed.stderr
    assert "Restoring states from the checkpoint" in resumed.stderr
    assert_same_run(uninterrupted, tmp_path)
    run = _run_dir(tmp_path)
    assert (run / "config.yaml").is_file() and (run / "config-2.yaml").is_file()


def _stop(data_dir, root, args, callback: str, code: int, **arguments) -> str:
    """Run ``fit`` in a new process with a test callback that stops it; its last line."""
    options = [f"--trainer.callbacks.{key}={value}" for key, value in arguments.items()]
    stopped = run_cli(
        *fit_args(data_dir, root, *args), f"--trainer.callbacks+=tests.helpers.{callback}", *options
    )
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    return last_line(stopped.stderr)


def _resume_and_compare(data_dir, root, args) -> None:
    """Resume in a new process, then compare with an uninterrupted run of the same command."""
    resumed = run_cli(*fit_args(data_dir, root, *args), "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = root.parent / f"{root.name}-uninterrupted"
    main(fit_args(data_dir, expected, *args))
    assert_same_run(expected, root)


SIGINT, SIGTERM = int(signal.SIGINT), int(signal.SIGTERM)


@pytest.mark.parametrize(
    ("extra", "callback", "arguments", "stopped_at"),
    [
        # dropout draws from the random generator: the checkpoint keeps its state
        (
            ["--model.dropout=0.3"],
            "SendSignalAt",
            {"signum": SIGINT, "step": 40},
            "stopped by SIGINT at epoch 2, batch 11 (step 41); saved ",  # the batch in flight
        ),
        # inside an accumulation window the gradients are not saved: stop at the window's end
        (
            ["--trainer.accumulate_grad_batches=4"],
            "SendSignalAt",
            {"signum": SIGTERM, "step": 9},
            "at epoch 2, batch 8 (step 10)",
        ),
        # worker processes load the batches: the order continues where it stopped
        (["--data.num_workers=2"], "SendSignalAt", {"signum": SIGTERM, "step": 40}, "at epoch 2"),
        # what configs/fast.yaml adds (AdamW's fused step, cutout drawn from the step), in
        # the bf16 matrix products a GPU would run it with: as repeatable on a CPU
        (
            [
                "--trainer.precision=bf16-mixed",
                "--model.optimizer=torch.optim.AdamW",
                "--model.optimizer.init_args.fused=true",
                "--data.augment_cutout=4",
            ],
            "SendSignalAt",
            {"signum": SIGTERM, "step": 40},
            "at epoch 2",
        ),
        # the epoch's last batch: its validation, train/acc and checkpoint come first
        ([], "SendSignalAt", {"signum": SIGINT, "step": 29}, "after epoch 1 (step 30)"),
        # a validation is due after the batch: it runs, then the run stops
        (
            ["--trainer.val_check_interval=0.25"],
            "SendSignalAt",
            {"signum": SIGINT, "step": 6},
            "at epoch 1, batch 8 (step 8)",
        ),
        # a signal during a validation in the middle of an epoch: it finishes, then a batch
        (
            ["--trainer.val_check_interval=0.25"],
            "SendSignalInValidation",
            {"signum": SIGTERM, "nth": 2},
            "at epoch 1, batch 15 (step 15)",
        ),
    ],
    ids=[
        "dropout",
        "accumulation",
        "workers",
        "bf16",
        "last-batch",
        "validation-due",
        "in-validation",
    ],
)
def test_a_stop_anywhere_resumes_exactly(
    extra, callback, arguments, stopped_at, data_dir, tmp_path
):
    args = (*SHORT, *extra)
    code = 128 + arguments["signum"]
    line = _stop(data_dir, tmp_path / "run", args, callback, code, **arguments)
    assert stopped_at in line, line
    _resume_and_compare(data_dir, tmp_path / "run", args)


def _resume_and_compare_but_the_stop(data_dir, root: Path, args, stop: int) -> None:
    """Resume in a new process and compare with an uninterrupted run: the same weights and
    curves, but for what Lightning writes when training stops early (``should_stop``): a
    validation at the stop, and the training values of the batch it stops after."""
    resumed = run_cli(*fit_args(data_dir, root, *args), "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected_root = root.parent / "uninterrupted"
    main(fit_args(data_dir, expected_root, *args))
    assert_same_weights(expected_root, root)
    expected_curves, got_curves = _scalars(expected_root), _scalars(root)
    for tag in COMPARED_SCALARS:
        got, expected = got_curves[tag], expected_curves[tag]
        extra = [point for point in got if point not in expected]
        assert all(stop - 1 <= step <= stop for step, _ in extra), (tag, extra)
        assert [point for point in got if point not in extra] == expected, tag


@pytest.mark.parametrize(
    ("extra", "stop_at", "stopped_at_step"),
    [
        ([], "step=40", 40),
        # the 9th batch of epoch 1 is within an accumulation window of 4 (epoch 0 made 8
        # steps): training goes on to the window's end, step 11, then stops
        (["--trainer.accumulate_grad_batches=4"], "batch=39", 11),
        # several steps a call: the stop comes at the end of the call (steps 38 to 42)
        (["--model.steps_per_call=4"], "step=41", 42),
    ],
    ids=["one-step-a-call", "accumulation", "four-steps-a-call"],
)
def test_a_stop_within_an_epoch_by_should_stop_resumes_exactly(
    extra, stop_at, stopped_at_step, data_dir, tmp_path
):
    """``max_time`` and early stops end training within an epoch that Lightning then counts
    as done; the last checkpoint is the state where it stopped, so a resume trains the rest."""
    args = (*SHORT, *extra)
    stopped = run_cli(
        *fit_args(data_dir, tmp_path / "run", *args),
        "--trainer.callbacks+=tests.helpers.StopTrainingAt",
        f"--trainer.callbacks.{stop_at}",
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    note = f"note: training stops within epoch 2 (step {stopped_at_step},"
    assert note in stopped.stderr, stopped.stderr[-3000:]
    last = _final_state(tmp_path / "run")
    assert last["global_step"] == stopped_at_step
    assert not last["callbacks"]["ResumableTraining"]["epoch_finished"]
    _resume_and_compare_but_the_stop(data_dir, tmp_path / "run", args, stopped_at_step)


def test_max_time_stops_within_an_epoch_and_the_run_resumes_exactly(data_dir, tmp_path):
    args = (
        *SHORT,
        "--trainer.callbacks+=tests.helpers.SlowSteps",
        "--trainer.callbacks.seconds=0.05",
    )
    run = tmp_path / "run"
    stopped = run_cli(*fit_args(data_dir, run, *args, "--trainer.max_time=00:00:00:01"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "note: training stops within epoch 1" in stopped.stderr  # 1 s of 3 s of steps
    assert "test/acc" in stopped.stdout  # Lightning's end: the best checkpoint is tested
    stop = _final_state(run)["global_step"]
    assert 0 < stop < 30
    # resumed without the limit (a Timer keeps its elapsed time in the checkpoint)
    _resume_and_compare_but_the_stop(data_dir, run, args, stop)


def test_a_kill_9_after_a_step_checkpoint_resumes_exactly(data_dir, tmp_path):
    args = (*SHORT, "--checkpoint.every_n_train_steps=7")
    _stop(data_dir, tmp_path / "run", args, "KillAt", -signal.SIGKILL, step=45)
    assert _final_state(tmp_path / "run")["global_step"] == 42  # the last step checkpoint
    _resume_and_compare(data_dir, tmp_path / "run", args)
    # `runs` counts what the killed process logged after its checkpoint once, as TensorBoard
    resumed, straight = (
        read_run(_run_dir(root), root / "lightning_logs")
        for root in (tmp_path / "run", tmp_path / "run-uninterrupted")
    )
    assert resumed.curves == straight.curves and resumed.curves["train/loss"]
    assert (resumed.best_val_acc, resumed.test_acc) == (straight.best_val_acc, straight.test_acc)
    assert resumed.state == "finished"


def test_epochs_without_validation_still_write_the_last_checkpoint(data_dir, tmp_path):
    args = (*SHORT, "--trainer.max_epochs=3", "--trainer.check_val_every_n_epoch=2")
    _stop(data_dir, tmp_path / "run", args, "KillAt", -signal.SIGKILL, step=45)
    assert _final_state(tmp_path / "run")["global_step"] == 30  # epoch 1's end, not validated
    _resume_and_compare(data_dir, tmp_path / "run", args)


def _wait_for(predicate, process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_ctrl_c_from_outside_stops_with_130_and_the_run_completes(data_dir, tmp_path):
    args = fit_args(
        data_dir,
        tmp_path,
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=150",
        "--trainer.limit_val_batches=5",
        "--trainer.limit_test_batches=5",
        "--checkpoint.every_n_train_steps=20",
    )
    last = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"
    process = start_cli(*args)
    _wait_for(last.is_file, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert "stopped by SIGINT" in last_line(process.stderr.read())
    step = torch.load(last, weights_only=False)["global_step"]
    assert 0 < step < 300

    resumed = run_cli(*args, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(last, weights_only=False)["global_step"] == 300


def test_kill_9_at_any_moment_leaves_a_loadable_last_ckpt(data_dir, tmp_path):
    args = fit_args(
        data_dir,
        tmp_path,
        "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=100",
        "--trainer.limit_val_batches=5",
        "--trainer.limit_test_batches=5",
        # a checkpoint every step, so that a kill often lands in the middle of a write
        "--checkpoint.every_n_train_steps=1",
        "--checkpoint.monitor=null",
    )
    folder = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints"
    last = folder / "last.ckpt"

    def writing() -> bool:
        return any(folder.glob(".last.ckpt.*.part"))

    steps = []
    for moment in ("while writing", "between writes"):
        process = start_cli(*args, *(["--ckpt_path=last"] if steps else []))
        start_mtime = last.stat().st_mtime_ns if last.exists() else None
        _wait_for(lambda m=start_mtime: last.exists() and last.stat().st_mtime_ns != m, process)
        if moment == "while writing":
            _wait_for(writing, process)
        else:
            time.sleep(0.2)
        process.kill()
        assert process.wait(timeout=30) == -signal.SIGKILL
        checkpoint = torch.load(last, weights_only=False)  # never a torn file
        weights = {name for name in checkpoint["state_dict"] if name.startswith("model.")}
        assert weights == {
            f"model.linear_relu_stack.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")
        }
        steps.append(checkpoint["global_step"])
    assert steps == sorted(steps) and steps[0] > 0  # each run resumed and went further

    finished = run_cli(*args, "--ckpt_path=last")
    assert finished.returncode == 0, finished.stderr
    assert torch.load(last, weights_only=False)["global_step"] == 300
    assert not writing()  # the torn temporary files of the killed runs are gone


def test_a_signal_during_the_test_after_fit_says_the_checkpoints_are_kept(data_dir, tmp_path):
    result = run_cli(
        *fit_args(data_dir, tmp_path, *SHORT, "--trainer.max_epochs=1"),
        "--trainer.callbacks+=tests.helpers.SendSignalInEvaluation",
        f"--trainer.callbacks.signum={SIGINT}",
    )
    assert result.returncode == 130, result.stderr[-2000:]
    assert last_line(result.stderr) == (
        "error: stopped by SIGINT while testing; training's checkpoints are kept"
    )
    assert _final_state(tmp_path)["global_step"] == 30


def test_a_stop_with_weights_only_checkpoints_says_what_its_checkpoint_can_do(data_dir, tmp_path):
    # it advised `--ckpt_path last`, which then failed as "not a checkpoint this project wrote"
    args = [*SHORT, "--checkpoint.save_weights_only=true", "--model.steps_per_call=1"]
    line = _stop(data_dir, tmp_path, args, "SendSignalAt", 128 + SIGTERM, signum=SIGTERM, step=5)
    last = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"
    assert line == (
        f"error: stopped by SIGTERM at epoch 1, batch 6 (step 6); saved {last}. It holds the "
        "weights only (--checkpoint.save_weights_only), which validate, test and predict take: "
        "training cannot continue from it"
    )
    resumed = run_cli(*fit_args(data_dir, tmp_path, *args), "--ckpt_path=last")
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr
    assert last_line(resumed.stderr) == (
        f"error: --ckpt_path {last}: it holds the weights only (written with "
        "checkpoint.save_weights_only), which validate, test and predict take; fit cannot "
        "continue from it (nothing was run)"
    )
    tested = run_cli("test", *fit_args(data_dir, tmp_path, *SHORT)[1:], f"--ckpt_path={last}")
    assert tested.returncode == 0, tested.stderr[-2000:]
