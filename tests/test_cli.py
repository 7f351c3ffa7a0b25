"""The command line, end to end: real training on FashionMNIST, logs, checkpoints, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fashion_lightning.checks import cpu_has_bfloat16
from fashion_lightning.cli import main
from fashion_lightning.model import ImageClassifier
from tests.helpers import ROOT, SGD_CONFIG, TINY, built_cli, fit_args, last_line, run_cli


@pytest.mark.slow
def test_fit_trains_logs_checkpoints_and_tests(data_dir, tmp_path, capsys):
    main(
        fit_args(
            data_dir,
            tmp_path,
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=150",
            "--trainer.limit_val_batches=30",
            "--trainer.log_every_n_steps=10",
            # a larger step than the tutorial's so that 300 steps learn a lot
            "--model.optimizer.init_args.lr=0.1",
        )
    )
    run = tmp_path / "lightning_logs" / "sgd_0"
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints
    assert any(name.startswith(("epoch01-val_acc", "epoch02-val_acc")) for name in checkpoints)
    assert (run / "config.yaml").is_file() and (run / "hparams.yaml").is_file()

    events = EventAccumulator(str(run))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert tag in scalars, scalars
    train_loss = [e.value for e in events.Scalars("train/loss")]
    assert len(train_loss) == 30  # every 10 of 300 steps
    assert sum(train_loss[-5:]) / 5 < 0.6 * sum(train_loss[:3]) / 3
    val_acc = [e.value for e in events.Scalars("val/acc")]
    assert len(val_acc) == 2 and val_acc[-1] > 0.65  # chance is 0.10
    test_acc = events.Scalars("test/acc")[-1].value
    assert test_acc > 0.65
    assert "test/acc" in capsys.readouterr().out  # the table the user reads


@pytest.mark.slow
def test_a_second_new_run_into_a_pinned_folder_is_refused_and_loses_nothing(
    data_dir, tmp_path, capsys
):
    pinned = [
        "--trainer.logger=TensorBoardLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.version=pinned",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
    ]
    main(fit_args(data_dir, tmp_path, *pinned))
    run = tmp_path / "lightning_logs" / "pinned"
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(data_dir, tmp_path, *pinned, "--data.batch_size=32"))
    assert exit_.value.code != 0
    assert "holds files already" in last_line(capsys.readouterr().err)
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


def test_help_documents_every_data_and_model_argument(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in (
        "--data.data_dir",
        "Folder that holds (or will hold)",
        "--data.batch_size",
        "--data.val_size",
        "Training images held out for validation",
        "--data.seed",
        "--data.num_workers",
        "--data.source_dir",
        "--data.download",
        "--model.hidden_size",
        "Width of the MLP's two hidden layers",
        "--model.optimizer",
        "--checkpoint.monitor",
    ):
        assert phrase in text, phrase


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--model.no_such_key=1"], "no_such_key"),
        (["--data.batch_size=many"], "batch_size"),
        (["--config=does-not-exist.yaml"], "does-not-exist.yaml"),
    ],
)
def test_bad_input_is_jsonargparse_one_liner_with_exit_2(args, phrase, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(SGD_CONFIG), *args])
    assert exit_.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and phrase in error_lines[0]


def test_missing_data_is_a_one_line_error_without_traceback(tmp_path):
    result = run_cli(
        "fit",
        "--config",
        str(SGD_CONFIG),
        f"--data.data_dir={tmp_path / 'data'}",
        f"--data.source_dir={tmp_path / 'nothing'}",
        "--data.download=false",
        f"--trainer.default_root_dir={tmp_path}",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = last_line(result.stderr)
    assert last.startswith("error: FashionMNIST not found")
    assert "apt-get install -y dataset-fashion-mnist" in last


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--trainer.accelerator=auto"],
        ["--trainer.accelerator=cpu", "--trainer.precision=bf16-mixed"],
        ["--trainer.accelerator=cpu", "--model.compile=true"],
        ["--trainer.precision=bf16-true"],
        ["--trainer.precision=64-true"],
    ],
    ids=["auto", "bf16-mixed", "compile", "bf16-true", "64-true"],
)
def test_same_config_runs_with_accelerator_precision_and_compile_options(extra, data_dir, tmp_path):
    main(
        fit_args(
            data_dir,
            tmp_path,
            *extra,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=20",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            "--model.optimizer.init_args.lr=0.1",
        )
    )
    checkpoint = torch.load(
        tmp_path / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert checkpoint["global_step"] == 20
    # compiled or not, the weights keep the tutorial's names and load into a plain model
    model = ImageClassifier()
    model.load_state_dict(checkpoint["state_dict"])


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_bfloat16_on_a_cpu_without_its_instructions_says_to_use_32_bit(
    precision, data_dir, tmp_path, capsys
):
    main(
        fit_args(
            data_dir,
            tmp_path,
            "--trainer.accelerator=cpu",
            f"--trainer.precision={precision}",
            "--trainer.max_epochs=1",
            # 2, not 1: the command line reads 1 as 1.0, all of the batches
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
        )
    )
    noted = "runs many times slower than 32-true; pass --trainer.precision 32-true"
    # emulated bfloat16 took 35 s an epoch of fast.yaml on an AVX2 CPU, float32 2 s
    slow = precision == "bf16-mixed" and not cpu_has_bfloat16()
    assert (noted in capsys.readouterr().err) == slow


@pytest.mark.parametrize(
    ("extra", "refresh_rate"),
    [
        ([], 10),
        (["--trainer.callbacks+=tests.helpers.RecordLearningRate"], 10),
        (["--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate=3"], 3),
    ],
    ids=["default", "with-a-callback-added", "bar-configured"],
)
def test_default_progress_bar_redraws_every_ten_batches(extra, refresh_rate, tmp_path):
    cli = built_cli("--config", str(SGD_CONFIG), f"--trainer.default_root_dir={tmp_path}", *extra)
    assert cli.trainer.progress_bar_callback.refresh_rate == refresh_rate


@pytest.mark.slow
def test_relative_paths_are_under_the_folder_it_runs_from(tmp_path, debian_source):
    # data_dir: data and the default root are relative: a run from elsewhere writes there
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fashion_lightning",
            "fit",
            "--config",
            str(SGD_CONFIG),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert (tmp_path / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt").is_file()


def test_the_progress_bar_names_the_whole_run(data_dir, tmp_path, capsys):
    args = fit_args(data_dir, tmp_path, *TINY, "--trainer.enable_progress_bar=true")
    main(args)
    assert "v_num=sgd_0" in capsys.readouterr().out  # Lightning alone would show "gd_0"


@pytest.mark.parametrize(
    ("given", "limit"),
    [("1", 1), ("3", 3), ("1.0", 1.0), ("0.25", 0.25), ("0", 0)],
)
def test_a_batch_limit_is_batches_when_whole_and_a_fraction_otherwise(given, limit, data_dir):
    # Lightning's CLI read `--trainer.limit_train_batches 1` as 1.0: the whole epoch
    args = ["--config", str(SGD_CONFIG), f"--data.data_dir={data_dir}"]
    limits = [f"--trainer.limit_{kind}_batches={given}" for kind in ("train", "val", "test")]
    cli = built_cli(*args, *limits, f"--trainer.overfit_batches={given}")
    trainer = cli.trainer
    for value in (trainer.limit_train_batches, trainer.limit_val_batches, trainer.overfit_batches):
        assert value == limit and type(value) is type(limit)


def test_one_batch_a_epoch_trains_one_batch_and_its_config_says_so(data_dir, tmp_path):
    args = fit_args(data_dir, tmp_path, "--trainer.max_epochs=2", "--model.steps_per_call=1")
    main([*args, "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0.5"])
    run = tmp_path / "lightning_logs" / "sgd_0"
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    saved = (run / "config.yaml").read_text()
    assert "limit_train_batches: 1\n" in saved and "limit_val_batches: 0.5\n" in saved


def test_overfit_batches_counts_batches_like_the_limits(data_dir, tmp_path, capsys):
    # Lightning replaces the loader's order and counts calls: 16 batches a call with the configs
    args = fit_args(data_dir, tmp_path, "--trainer.max_epochs=2", "--trainer.limit_test_batches=2")
    main([*args, "--trainer.overfit_batches=1"])
    last = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert "(--trainer.overfit_batches counts calls)" in capsys.readouterr().err
