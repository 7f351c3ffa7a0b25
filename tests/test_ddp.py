"""The same config on two CPU processes with DDP (gloo), for real."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.datasets import FashionMNIST

from fashion_lightning.cli import main
from fashion_lightning.data import EpochShuffleSampler
from tests.helpers import SGD_CONFIG, TINY, fit_args, lines_on_a_terminal, run_cli

DDP_ON_TWO = ("--trainer.accelerator=cpu", "--trainer.devices=2", "--model.steps_per_call=1")

pytestmark = pytest.mark.slow


def _scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_ddp_on_two_cpu_processes(data_dir, tmp_path):
    orders = tmp_path / "orders"
    orders.mkdir()
    ddp = (
        "--trainer.strategy=ddp",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=40",
        "--model.optimizer.init_args.lr=0.05",
    )
    result = run_cli(
        *fit_args(
            data_dir,
            tmp_path,
            *ddp,
            "--trainer.callbacks+=tests.helpers.RecordTrainOrder",
            f"--trainer.callbacks.folder={orders}",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # values computed from synced metrics are logged as such: no warning that does not apply
    assert "It is recommended to use `self.log(" not in result.stderr
    assert result.stderr.count("Testing the best checkpoint") == 1
    # prepare_data ran on one process: once for fit and once for the test after it (4 if per rank)
    assert result.stderr.count("FashionMNIST: verified raw files in") == 2

    # each rank gets a disjoint share of the epoch's order, a new order each epoch, a function
    # of (seed, epoch): every second image from its rank on (the first 40 batches of each: with
    # several steps a call the order itself stops there)
    for epoch in (0, 1):
        ranks = [
            json.loads((orders / f"order-rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)
        ]
        assert len(ranks[0]) == len(ranks[1]) == 40 * 64
        assert not set(ranks[0]) & set(ranks[1])
        whole = EpochShuffleSampler(55000, seed=42)
        whole.set_epoch(epoch)
        assert set(ranks[0]) | set(ranks[1]) == set(list(whole)[: 2 * 40 * 64])
        for rank, seen in enumerate(ranks):
            assert seen == list(whole)[rank : 2 * 40 * 64 : 2]  # every second from its rank
    assert (
        json.loads((orders / "order-rank0-epoch0.json").read_text())[:100]
        != json.loads((orders / "order-rank0-epoch1.json").read_text())[:100]
    )

    # only rank 0 wrote: one run folder, one process's event files, one set of checkpoints
    runs = list((tmp_path / "lightning_logs").iterdir())
    assert [run.name for run in runs] == ["sgd_0"]
    run = runs[0]
    writers = {path.name.split(".")[-2] for path in run.glob("events.out.tfevents.*")}
    assert len(writers) == 1, writers
    checkpoints = sorted(path.name for path in (run / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints

    # val/acc synchronized across ranks equals one process's on the same weights
    ddp_val_acc = _scalars(run, "val/acc")[-1]
    single = tmp_path / "single"
    main(
        [
            "validate",
            *fit_args(data_dir, single)[1:],
            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        ]
    )
    assert _scalars(single / "lightning_logs" / "sgd_0", "val/acc") == [ddp_val_acc]

    # several optimizer steps a call (the configs' 16) give the same run as one under DDP too
    one = tmp_path / "one-step-a-call"
    result = run_cli(*fit_args(data_dir, one, *ddp, "--model.steps_per_call=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = torch.load(one / "lightning_logs/sgd_0/checkpoints/last.ckpt", weights_only=True)
    got = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["global_step"] == expected["global_step"] == 2 * 40
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name


def test_ddp_on_three_processes_counts_every_evaluation_image_once(data_dir, tmp_path):
    # 5000 validation and 10000 test images do not split evenly in 3: Lightning's own sampler
    # would repeat images to even the shares out, and the metrics would count them twice
    result = run_cli(
        *fit_args(
            data_dir,
            tmp_path,
            "--trainer.strategy=ddp",
            "--trainer.accelerator=cpu",
            "--trainer.devices=3",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=5",
            "--model.optimizer.init_args.lr=0.05",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "sgd_0"
    last = run / "checkpoints" / "last.ckpt"
    single = tmp_path / "single"
    for subcommand in ("validate", "test"):
        main([subcommand, *fit_args(data_dir, single)[1:], f"--ckpt_path={last}"])
    single_runs = single / "lightning_logs"
    assert _scalars(run, "val/acc") == _scalars(single_runs / "sgd_0", "val/acc")
    assert _scalars(run, "val/loss") == pytest.approx(
        _scalars(single_runs / "sgd_0", "val/loss"), rel=1e-6
    )
    assert _scalars(run, "test/acc") == _scalars(single_runs / "sgd_1", "test/acc")


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_a_run_in_started_processes_keeps_fit_and_its_test_in_one_folder(
    strategy, data_dir, tmp_path
):
    # these strategies run fit, then the test after it, in new processes each: every process
    # had claimed a run folder of its own, and the test had written a second config file
    started = (
        f"--trainer.strategy={strategy}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.limit_train_batches=5",
    )
    result = run_cli(*fit_args(data_dir, tmp_path, *started, "--trainer.max_epochs=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    # the processes quiet what the project makes irrelevant as the command's own process does
    assert "LeafSpec" not in result.stderr and "It is recommended" not in result.stderr
    assert [run.name for run in (tmp_path / "lightning_logs").iterdir()] == ["sgd_0"]
    run = tmp_path / "lightning_logs" / "sgd_0"
    assert [path.name for path in run.glob("config*.yaml")] == ["config.yaml"]
    assert len(_scalars(run, "val/acc")) == 1
    assert len(_scalars(run, "test/acc")) == 1

    # continued: the test after it no longer hides (purges) the steps the resumed fit wrote
    result = run_cli(
        *fit_args(data_dir, tmp_path, *started, "--trainer.max_epochs=2", "--ckpt_path=last")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [run.name for run in (tmp_path / "lightning_logs").iterdir()] == ["sgd_0"]
    assert _scalars(run, "train/epochs_done") == [1.0, 2.0]
    assert len(_scalars(run, "val/acc")) == 2
    assert len(_scalars(run, "test/acc")) == 2


@pytest.mark.parametrize(
    "strategy, signum, group",
    [
        ("ddp", signal.SIGTERM, False),  # hung: process 1 waited for process 0 forever
        ("ddp_spawn", signal.SIGTERM, False),  # the command ended, its processes trained on
        ("ddp_fork", signal.SIGTERM, False),
        ("ddp_spawn", signal.SIGINT, True),  # stopped right, but said nothing was saved
    ],
)
def test_a_signal_to_the_command_stops_every_process_at_one_step_with_a_checkpoint(
    strategy, signum, group, data_dir, tmp_path
):
    processes = (
        f"--trainer.strategy={strategy}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=20",
        "--model.steps_per_call=1",
    )
    signalled = (
        "--trainer.callbacks+=tests.helpers.SignalTheCommandAt",
        f"--trainer.callbacks.signum={int(signum)}",
        "--trainer.callbacks.step=5",
        f"--trainer.callbacks.group={group}",
    )
    result = run_cli(*fit_args(data_dir, tmp_path, *processes, *signalled), new_session=True)
    assert result.returncode == 128 + signum, result.stderr[-3000:]
    last = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"
    stopped = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(stopped) == 1, result.stderr[-3000:]  # said once, by the command
    step = torch.load(last, weights_only=True)["global_step"]
    assert stopped[0].startswith(f"error: stopped by {signum.name} at epoch 1, batch ")
    assert f"(step {step}); saved {last}. " in stopped[0]
    assert 5 <= step < 20  # the processes stopped together, in the first epoch
    assert "Traceback" not in result.stderr
    assert result.stderr.count(f"{signum.name} received") == 1

    # and the run continues from there to its end
    result = run_cli(*fit_args(data_dir, tmp_path, *processes, "--ckpt_path=last"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 2 * 20
    assert _scalars(tmp_path / "lightning_logs" / "sgd_0", "train/epochs_done") == [1.0, 2.0]


def test_predict_on_three_processes_writes_one_file_like_one_process(
    trained_run, data_dir, tmp_path
):
    checkpoint = f"--ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}"
    single = tmp_path / "single"
    main(["predict", *fit_args(data_dir, single)[1:], checkpoint])
    result = run_cli(
        "predict",
        *fit_args(data_dir, tmp_path / "three")[1:],
        checkpoint,
        "--trainer.strategy=ddp",
        "--trainer.accelerator=cpu",
        "--trainer.devices=3",  # 10,000 images in shares of 3334, 3333, 3333
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "three" / "lightning_logs" / "sgd_0"
    assert [path.name for path in folder.glob("predictions*.csv")] == ["predictions.csv"]
    expected = (single / "lightning_logs" / "sgd_0" / "predictions.csv").read_text()
    assert (folder / "predictions.csv").read_text() == expected
    assert result.stdout.count("predictions: 10000 test images, accuracy") == 1


def test_a_weight_averaged_recipe_runs_under_ddp(data_dir, tmp_path):
    # its weight average deep-copies the model, whose optimizer reached the CLI and, under ddp,
    # the launcher's processes: "cannot pickle '_thread.lock' object" at the start
    args = fit_args(
        data_dir,
        tmp_path,
        "--trainer.strategy=ddp",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=5",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
    )
    args[2] = str(SGD_CONFIG.parent / "best.yaml")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_scalars(tmp_path / "lightning_logs" / "best_0", "test/acc")) == 1


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_a_second_signal_soon_after_the_first_ends_every_process_in_one_line(
    strategy, data_dir, tmp_path
):
    # an exception raised at once inside a collective was swallowed by Lightning: the processes
    # fell out of step and waited for each other forever, or ended in tracebacks
    result = run_cli(
        *fit_args(
            data_dir,
            tmp_path,
            f"--trainer.strategy={strategy}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=40",
            "--model.steps_per_call=1",
            "--trainer.callbacks+=tests.helpers.SignalTheCommandAt",
            f"--trainer.callbacks.signum={int(signal.SIGINT)}",
            "--trainer.callbacks.step=5",
            "--trainer.callbacks.group=true",
            "--trainer.callbacks.twice=true",
        ),
        new_session=True,
        timeout=120,
    )
    assert result.returncode == 130, result.stderr[-3000:]
    stopped = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(stopped) == 1 and stopped[0].startswith("error: stopped by SIGINT"), stopped
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_a_checkpoint_every_process_refuses_is_said_once_and_leaves_no_run_folder(
    strategy, trained_run, data_dir, tmp_path
):
    # refused once the data knows an epoch's size, in every process alike: each said it (ddp),
    # or it came back as the traceback of a started process (ddp_spawn)
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["callbacks"]["ResumableTraining"].update(epoch_finished=False, images_done=10**9)
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    runs = tmp_path / "runs"
    args = fit_args(data_dir, runs, f"--trainer.strategy={strategy}", *DDP_ON_TWO)
    resumed = (
        "--trainer.max_epochs=3",
        "--model.optimizer.init_args.lr=0.05",
        f"--ckpt_path={crafted}",
    )
    result = run_cli(*args, *resumed, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert _error_lines(result.stderr) == [
        f"error: --ckpt_path {crafted}: callbacks.ResumableTraining.images_done: 1000000000 "
        "images of its epoch were done, more than the 27520 of an epoch of this run "
        "(limit_train_batches smaller than the stopped run's, or a crafted checkpoint); "
        "nothing was run"
    ]
    assert "Traceback" not in result.stderr and "Terminating process" not in result.stderr
    assert not (runs / "lightning_logs").exists()


def test_a_started_process_killed_from_outside_keeps_the_run_and_says_how_to_continue(
    data_dir, tmp_path
):
    # the command's process saw no stage begin (its started processes ran it) and gave the
    # run's folder back, checkpoints and all
    args = fit_args(
        data_dir,
        tmp_path,
        "--trainer.strategy=ddp_spawn",
        *DDP_ON_TWO,
        "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=10",
        "--trainer.callbacks+=tests.helpers.KillAt",
        "--trainer.callbacks.step=15",
        "--trainer.callbacks.rank=1",
    )
    result = run_cli(*args, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    folder = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints"
    assert _error_lines(result.stderr) == [
        "error: process 1 terminated with signal SIGKILL (ended from outside: killed, or out "
        f"of memory); the newest complete checkpoint is {folder / 'last.ckpt'}; continue with "
        "--ckpt_path last"
    ]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 10
    assert len(list(folder.glob("epoch*.ckpt"))) == 1


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_predict_on_two_processes_needs_a_picture_each_and_names_a_skipped_file_once(
    strategy, trained_run, data_dir, tmp_path
):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    test_set = FashionMNIST(str(data_dir), train=False)
    test_set[0][0].save(pictures / "a.png")
    (pictures / "notes.txt").write_text("not a picture")
    predict = (
        "predict",
        *fit_args(data_dir, tmp_path / "runs")[1:],
        f"--ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        f"--data.predict_dir={pictures}",
        f"--trainer.strategy={strategy}",
        *DDP_ON_TWO,
    )
    # Lightning refused the empty share of process 1 alone, in the middle of the stage; it
    # was said as the checkpoint's fault, and process 0 ended in gloo's traceback
    result = run_cli(*predict, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert _error_lines(result.stderr) == [
        f"error: --data.predict_dir {pictures}: 1 picture, fewer than the 2 processes, each "
        "of which evaluates one at least; run on fewer (--trainer.devices 1)"
    ]
    assert "Traceback" not in result.stderr

    test_set[1][0].save(pictures / "b.png")
    result = run_cli(*predict, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("skipped notes.txt: not an image") == 1, result.stderr[-3000:]


def test_a_run_ddp_spawn_cannot_copy_is_one_line(data_dir, tmp_path):
    # Lightning's EMAWeightAveraging keeps a local function, which pickle cannot copy
    args = fit_args(data_dir, tmp_path, "--trainer.strategy=ddp_spawn", *DDP_ON_TWO)
    args[2] = str(SGD_CONFIG.parent / "best.yaml")
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert _error_lines(result.stderr) == [
        "error: --trainer.strategy ddp_spawn copies the run into each process it starts, and "
        "cannot copy part of it (Can't pickle local object 'get_ema_avg_fn.<locals>.ema_update'); "
        "use --trainer.strategy ddp or ddp_fork, which do not copy it"
    ]
    assert not (tmp_path / "lightning_logs").exists()


def _run_in(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_under_ddp_spawn_a_refused_resume_leaves_the_run_folder_as_it_was(data_dir, tmp_path):
    # the started processes wrote a config and an events file that this process never heard of
    args = fit_args(data_dir, tmp_path, "--trainer.strategy=ddp_spawn", *DDP_ON_TWO, *TINY)
    result = run_cli(*args, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "sgd_0"
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["callbacks"]["ResumableTraining"].update(epoch_finished=False, images_done=10**6)
    torch.save(checkpoint, last)
    before = _run_in(run)
    result = run_cli(*args, "--trainer.max_epochs=2", "--ckpt_path=last", timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(_error_lines(result.stderr)) == 1, result.stderr[-3000:]
    assert _run_in(run) == before


@pytest.mark.parametrize("command", ["test", "predict"])
def test_under_ddp_spawn_a_stopped_evaluation_leaves_no_run_folder(
    command, trained_run, data_dir, tmp_path
):
    result = run_cli(
        command,
        *fit_args(data_dir, tmp_path, "--trainer.strategy=ddp_spawn", *DDP_ON_TWO)[1:],
        f"--ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        "--trainer.callbacks+=tests.helpers.SendSignalInEvaluation",
        f"--trainer.callbacks.signum={int(signal.SIGINT)}",
        "--trainer.callbacks.group=true",
        new_session=True,
        timeout=120,
    )
    assert result.returncode == 130, result.stderr[-3000:]
    assert _error_lines(result.stderr) == ["error: stopped by SIGINT; nothing was saved"]
    assert "saving a checkpoint" not in result.stderr  # there is none to save
    assert not (tmp_path / "lightning_logs").exists()


def test_under_ddp_spawn_an_error_in_training_starts_a_line_of_its_own(data_dir, tmp_path):
    # the started processes' bar, the command's error: they end without Lightning's on_exception
    args = fit_args(data_dir, tmp_path, "--trainer.strategy=ddp_spawn", *DDP_ON_TWO, *TINY)
    code, lines = lines_on_a_terminal(*args, "--model.optimizer.init_args.lr=1e6", timeout=120)
    assert code == 1 and any(line.startswith("Epoch 0:") for line in lines), lines[-20:]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: training loss became nan"), errors
