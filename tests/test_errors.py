"""Bad input: one line that names the cause and the fix, a non-zero exit, nothing lost."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from fashion_lightning.cli import main
from tests.helpers import (
    ROOT,
    SGD_CONFIG,
    TINY,
    fit_args,
    last_line,
    lines_on_a_terminal,
    run_cli,
)


def _fails(args: list[str], capsys, exit_code: int = 1) -> str:
    """Run the CLI in-process; return its one error line (and check there is just one)."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == exit_code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture(scope="module")
def checkpoints(data_dir, tmp_path_factory) -> dict[str, Path]:
    """A real checkpoint of this project, and one of Lightning's demo model."""
    root = tmp_path_factory.mktemp("checkpoints")
    main(fit_args(data_dir, root, *TINY))
    other = L.Trainer(default_root_dir=root, max_steps=1, logger=False, enable_progress_bar=False)
    other.fit(BoringModel())
    other.save_checkpoint(root / "boring.ckpt")
    return {
        "ours": root / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt",
        "other": root / "boring.ckpt",
    }


def _bad_checkpoint(kind: str, checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "missing":
        return path
    if kind == "empty":
        path.touch()
    elif kind == "truncated":
        path.write_bytes(checkpoints["ours"].read_bytes()[:100_000])
    elif kind == "not a checkpoint":
        shutil.copy(SGD_CONFIG, path)
    elif kind == "other model":
        shutil.copy(checkpoints["other"], path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "phrase"),
    [
        ("missing", "no such file"),
        ("empty", "the file is empty"),
        ("truncated", "not a readable checkpoint, truncated"),
        ("not a checkpoint", "not a readable checkpoint"),
        ("other model", "a checkpoint of another model (differs in layer.bias (2,)"),
    ],
)
@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_bad_ckpt_path(kind, phrase, subcommand, checkpoints, data_dir, tmp_path, capsys):
    path = _bad_checkpoint(kind, checkpoints, tmp_path)
    before = path.read_bytes() if path.exists() else None
    args = fit_args(data_dir, tmp_path / "runs", *TINY, f"--ckpt_path={path}")
    args[0] = subcommand
    line = _fails(args, capsys)
    assert line.startswith(f"error: --ckpt_path {path}: {phrase}"), line
    assert (path.read_bytes() if path.exists() else None) == before
    assert not (tmp_path / "runs" / "lightning_logs").exists()  # no run was started


@pytest.mark.slow
def test_good_explicit_ckpt_path_still_works(checkpoints, data_dir, tmp_path, capsys):
    main(["test", *fit_args(data_dir, tmp_path, *TINY)[1:], f"--ckpt_path={checkpoints['ours']}"])
    assert "test/acc" in capsys.readouterr().out


def test_resume_last_with_nothing_to_resume_is_an_error_not_a_fresh_start(
    data_dir, tmp_path, capsys
):
    line = _fails(fit_args(data_dir, tmp_path, *TINY, "--ckpt_path=last"), capsys)
    assert line == (
        f"error: --ckpt_path last: no last.ckpt under {tmp_path / 'lightning_logs'} to resume; "
        "drop --ckpt_path to start a new run"
    )
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.slow
def test_nan_loss_stops_at_once_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, capsys):
    args = fit_args(
        data_dir,
        tmp_path,
        "--model.optimizer.init_args.lr=1e6",
        "--checkpoint.every_n_train_steps=1",
        "--checkpoint.monitor=null",
        "--model.steps_per_call=1",  # a checkpoint after every step
    )
    line = _fails(args, capsys)
    last = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"
    assert line.startswith("error: training loss became nan at step ")
    assert (
        f"the last good checkpoint is {last}" in line and "--model.optimizer.init_args.lr" in line
    )
    step = int(line.split(" at step ")[1].split()[0])
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == step < 10  # stopped at the first bad step
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


@pytest.mark.slow
def test_an_error_in_training_starts_a_line_of_its_own_after_the_progress_bar(data_dir, tmp_path):
    args = fit_args(data_dir, tmp_path, "--model.optimizer.init_args.lr=1e6")
    code, lines = lines_on_a_terminal(*args, "--model.steps_per_call=1")
    assert code == 1 and any(line.startswith("Epoch 0:") for line in lines), lines[-20:]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: training loss became nan"), errors


def test_damaged_data_file_is_one_line_through_the_cli(raw_copy, tmp_path, capsys):
    truncated = raw_copy / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    line = _fails(fit_args(raw_copy, tmp_path, *TINY), capsys)
    assert line.startswith(
        f"error: {truncated}: truncated: 5000 bytes, expected 7840016; delete it"
    )
    assert truncated.stat().st_size == 5000


@pytest.mark.parametrize(
    ("option", "phrase"),
    [
        ("--data.data_dir", "cannot write to {path}/FashionMNIST/raw"),
        ("--trainer.default_root_dir", "cannot write run outputs to {path}/lightning_logs"),
    ],
)
def test_unwritable_location_is_one_line(option, phrase, tmp_path, capsys):
    # A regular file where a folder must go: unwritable even for root (which ignores modes).
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    path = blocker / "inside"
    args = fit_args(tmp_path / "data", tmp_path, *TINY, "--data.source_dir=/nonexistent")
    args.append(f"{option}={path}")
    line = _fails(args, capsys)
    assert line.startswith("error: " + phrase.format(path=path)), line
    assert "Not a directory" in line and "pass a writable " + option in line
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize(
    ("option", "phrase"),
    [
        ("--data.batch_size=0", 'Parser key "data.batch_size": Not of type PositiveInt'),
        ("--data.eval_batch_size=-1", 'Parser key "data.eval_batch_size": Not of type PositiveInt'),
        ("--data.val_size=60000", 'Parser key "data.val_size": Not of type ValidationSize'),
        ("--data.num_workers=-1", 'Parser key "data.num_workers": Not of type NonNegativeInt'),
        ("--model.hidden_size=0", 'Parser key "model.hidden_size": Not of type HiddenSize'),
        ("--model.hidden_size=1000000000000", 'Parser key "model.hidden_size": Not of type'),
        ("--seed_everything=-1", "--seed_everything -1: a seed is a whole number from 0 to"),
        (
            "--model.optimizer.init_args.lr=nan",
            "Parser key \"model.optimizer.init_args.lr\": 'nan' is not a float (torch.optim.SGD)",
        ),
        ("--model.optimizer.init_args.foo=1", "torch.optim.SGD takes no argument 'foo'"),
        ("--weights_only=false", "weights_only takes true or null only: this project reads"),
        ("--model.label_smoothing=2", 'Parser key "model.label_smoothing": Not of type'),
        ("--model.dropout=1.5", 'Parser key "model.dropout": Not of type DropoutProbability'),
        ("--images.every_n_epochs=-1", 'Parser key "images.every_n_epochs": Not of type'),
        ("--optimizer=Adam", "unrecognized arguments: --optimizer=Adam"),
        ("--data.seed=18446744073709551615", 'Parser key "data.seed": Not of type Seed'),
        ("--checkpoint.save_last=link", 'Parser key "checkpoint.save_last"'),
    ],
)
def test_out_of_range_values_are_refused_when_parsing(option, phrase, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(tmp_path / "data", tmp_path, option))
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # not jsonargparse's 80 lines of usage first
    assert lines[0].startswith("error: ") and phrase in lines[0], lines[0]
    assert lines[0].endswith(" fit --help)")  # where to read more
    assert not (tmp_path / "lightning_logs").exists() and not (tmp_path / "data").exists()


def test_an_optimizer_value_torch_refuses_is_one_line_before_a_run_starts(tmp_path, capsys):
    args = fit_args(tmp_path / "data", tmp_path, "--model.optimizer.init_args.lr=-1")
    line = _fails(args, capsys, exit_code=2)
    assert line == "error: --model.optimizer: Invalid learning rate: -1.0"
    assert not list(tmp_path.glob("lightning_logs/*"))


@pytest.mark.slow
def test_an_unwritable_checkpoint_folder_is_one_line_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    args = fit_args(tmp_path / "data", tmp_path, f"--checkpoint.dirpath={blocker / 'ck'}")
    line = _fails(args, capsys)
    assert line.startswith(f"error: cannot write checkpoints to {blocker / 'ck'} (")
    assert line.endswith("pass a writable --checkpoint.dirpath")


def test_evaluating_without_a_checkpoint_says_it_measures_an_untrained_model(
    data_dir, tmp_path, capsys
):
    main(["validate", *fit_args(data_dir, tmp_path, *TINY)[1:]])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: validate without --ckpt_path measures the untrained model; pass --ckpt_path "
        "best, last or a checkpoint file to measure a trained one"
    ]


def test_restricted_values_reach_checkpoints_as_plain_numbers(checkpoints):
    # Lightning reads the model's arguments back with weights_only=True: plain types only
    hparams = torch.load(checkpoints["ours"], weights_only=True)["hyper_parameters"]
    assert type(hparams["hidden_size"]) is int and type(hparams["dropout"]) is float


@pytest.mark.parametrize(
    ("option", "phrase"),
    [
        ("--trainer.max_epochs=-5", "error: `max_epochs` must be a non-negative integer or -1"),
        ("--trainer.accelerator=gpu", "error: --trainer.accelerator gpu: PyTorch sees no such"),
        (
            "--trainer.val_check_interval=1000",
            "error: --trainer.val_check_interval 1000: an epoch has 860 training batches",
        ),
        (
            "--checkpoint.filename=../../../../x",
            "error: --checkpoint.filename ../../../../x: a checkpoint's name is a file name",
        ),
        (
            "--model.optimizer.init_args.lr=.nan",
            "error: --model.optimizer.init_args.lr nan: not a finite number",
        ),
    ],
)
def test_values_lightning_refuses_are_one_line(option, phrase, tmp_path, capsys):
    if option.endswith("gpu") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = 1 if "accelerator" in option else 2
    line = _fails(fit_args(tmp_path / "data", tmp_path, option), capsys, exit_code=code)
    assert line.startswith(phrase), line
    assert not (tmp_path / "lightning_logs").exists()


def test_a_logger_folder_that_leads_out_of_its_save_dir_is_refused(tmp_path, capsys):
    logger = [
        "--trainer.logger=TensorBoardLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.version=../../escaped",
    ]
    line = _fails(fit_args(tmp_path / "data", tmp_path, *logger), capsys, exit_code=2)
    assert line.startswith("error: --trainer.logger.init_args.version ../../escaped: a folder")
    assert not list(tmp_path.parent.glob("escaped")) and not list(tmp_path.iterdir())


def test_stochastic_weight_averaging_is_refused_in_one_line(tmp_path, capsys):
    args = fit_args(tmp_path / "data", tmp_path, "--trainer.callbacks+=StochasticWeightAveraging")
    line = _fails([*args, "--trainer.callbacks.swa_lrs=0.01"], capsys, exit_code=2)
    assert line.startswith("error: --trainer.callbacks StochasticWeightAveraging: its average")
    assert "--trainer.callbacks+=WeightAveraging" in line
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize("option", ["--ckpt_path", "--data.predict_dir"])
def test_a_path_too_long_to_exist_is_one_line(option, data_dir, tmp_path, capsys):
    path = tmp_path / ("x" * 300)
    subcommand = "predict" if option == "--data.predict_dir" else "test"
    args = [subcommand, *fit_args(data_dir, tmp_path / "runs", *TINY)[1:], f"{option}={path}"]
    line = _fails(args, capsys)
    assert line.startswith(f"error: {option} {path}: "), line
    assert "File name too long" in line
    assert not list((tmp_path / "runs").glob("lightning_logs/*"))  # no run folder


def test_version_prints_the_version(capsys):
    from fashion_lightning import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip().endswith(__version__)


def test_a_callback_whose_package_is_missing_is_one_line(tmp_path):
    result = run_cli(*fit_args(tmp_path / "data", tmp_path, "--trainer.callbacks+=RichProgressBar"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = last_line(result.stderr)  # Lightning's words: one line that names the package
    assert line.startswith("error: ") and "rich" in line


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ("", "the file is empty"),
        ("# only\n", "the file is empty"),
        ("- a\n", "it holds a list"),
        ("model: 3\n", "'model:' holds 3, not settings"),
    ],
)
def test_an_empty_or_odd_config_file_says_what_is_wrong(content, phrase, tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text(content)
    line = _fails(["fit", "--config", str(config)], capsys, exit_code=2)
    assert line.startswith(f"error: --config {config}: {phrase}"), line
    assert "a config maps trainer:, model: and data: to their settings" in line


@pytest.mark.slow
@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_into_an_unwritable_root_is_one_line(
    subcommand, checkpoints, data_dir, tmp_path, capsys
):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    args = fit_args(data_dir, blocker / "inside", *TINY, f"--ckpt_path={checkpoints['ours']}")
    line = _fails([subcommand, *args[1:]], capsys)
    assert line.startswith(
        f"error: cannot write run outputs to {blocker / 'inside'}/lightning_logs"
    )
    assert blocker.read_text() == "keep me"


def _on_a_small_disk(size: str, script: str, folder: Path) -> subprocess.CompletedProcess:
    """Run ``script`` in a shell where ``folder`` is a fresh tmpfs of ``size`` (a full disk)."""
    folder.mkdir()
    return subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            f"mount -t tmpfs -o size={size} tmpfs {folder} && {script}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(
    data_dir, tmp_path
):
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    # 7 MB: the first epoch's best and last checkpoints (2.7 MB each) fit, a third does not
    args = " ".join(
        fit_args(
            data_dir,
            disk,
            *TINY,
            "--trainer.max_epochs=3",
            "--model.optimizer.init_args.lr=0.1",
        )
    )
    result = _on_a_small_disk(
        "7m",
        f"{sys.executable} -m fashion_lightning {args}; echo rc=$? >&2; cp -a {disk} {copy}",
        disk,
    )
    assert "rc=1" in result.stderr, result.stderr[-3000:]
    errors = [
        line
        for line in result.stderr.splitlines()
        if "error" in line.lower() or "Traceback" in line
    ]
    assert len(errors) == 1, errors
    folder = copy / "lightning_logs" / "sgd_0" / "checkpoints"
    assert errors[0].startswith(
        f"error: cannot write {disk}/lightning_logs/sgd_0/checkpoints/epoch02"
    )
    assert ": No space left on device; the newest complete checkpoint is " in errors[0]
    assert errors[0].endswith("; free space, then continue with --ckpt_path last")
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (0, 3)  # the previous last.ckpt, whole
    assert not list(folder.glob(".*.part"))


def _error_lines(stderr: str) -> list[str]:
    return [
        line
        for line in stderr.splitlines()
        if "error" in line.lower() or "Traceback" in line or "Exception" in line
    ]


@pytest.mark.slow
def test_a_full_disk_while_writing_tensorboard_logs_is_one_line(data_dir, tmp_path):
    disk = tmp_path / "disk"
    # no checkpoints: the TensorBoard pictures are what fills 120 kB
    args = fit_args(
        data_dir,
        disk,
        *TINY,
        "--trainer.max_epochs=3",
        "--checkpoint.save_last=false",
        "--checkpoint.save_top_k=0",
    )
    result = _on_a_small_disk(
        "120k", f"{sys.executable} -m fashion_lightning {' '.join(args)}; echo rc=$? >&2", disk
    )
    assert "rc=1" in result.stderr, result.stderr[-3000:]
    assert _error_lines(result.stderr) == [
        f"error: cannot write the run outputs in {disk}/lightning_logs/sgd_0: No space left "
        "on device; no checkpoint was written yet; free space and run again"
    ]


@pytest.mark.slow
def test_a_full_disk_while_writing_predictions_is_one_line_and_leaves_no_partial_file(
    checkpoints, data_dir, tmp_path
):
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    args = fit_args(data_dir, disk, f"--ckpt_path={checkpoints['ours']}")
    command = f"{sys.executable} -m fashion_lightning predict {' '.join(args[1:])}"
    result = _on_a_small_disk("64k", f"{command}; echo rc=$? >&2; cp -a {disk} {copy}", disk)
    assert "rc=1" in result.stderr, result.stderr[-3000:]
    csv = f"{disk}/lightning_logs/sgd_0/predictions.csv"
    assert _error_lines(result.stderr) == [
        f"error: cannot write {csv}: No space left on device; free space and run again"
    ]
    assert (
        sorted(p.name for p in (copy / "lightning_logs" / "sgd_0").iterdir() if "pred" in p.name)
        == []
    )
