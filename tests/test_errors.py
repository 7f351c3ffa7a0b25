"""Bad input: one line that names the cause and the fix, a non-zero exit, nothing lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from fashion_lightning.cli import main
from tests.helpers import SGD_CONFIG, fit_args

TINY_RUN = (
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
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
    main(fit_args(data_dir, root, *TINY_RUN))
    other = L.Trainer(default_root_dir=root, max_steps=1, logger=False, enable_progress_bar=False)
    other.fit(BoringModel())
    other.save_checkpoint(root / "boring.ckpt")
    return {
        "ours": root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
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
    args = fit_args(data_dir, tmp_path / "runs", *TINY_RUN, f"--ckpt_path={path}")
    args[0] = subcommand
    line = _fails(args, capsys)
    assert line.startswith(f"error: --ckpt_path {path}: {phrase}"), line
    assert (path.read_bytes() if path.exists() else None) == before
    assert not (tmp_path / "runs" / "lightning_logs").exists()  # no run was started


@pytest.mark.slow
def test_good_explicit_ckpt_path_still_works(checkpoints, data_dir, tmp_path, capsys):
    main(
        ["test", *fit_args(data_dir, tmp_path, *TINY_RUN)[1:], f"--ckpt_path={checkpoints['ours']}"]
    )
    assert "test/acc" in capsys.readouterr().out


def test_resume_last_with_nothing_to_resume_is_an_error_not_a_fresh_start(
    data_dir, tmp_path, capsys
):
    line = _fails(fit_args(data_dir, tmp_path, *TINY_RUN, "--ckpt_path=last"), capsys)
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
    )
    line = _fails(args, capsys)
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert line.startswith("error: training loss became nan at step ")
    assert (
        f"the last good checkpoint is {last}" in line and "--model.optimizer.init_args.lr" in line
    )
    step = int(line.split(" at step ")[1].split()[0])
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == step < 10  # stopped at the first bad step
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def test_damaged_data_file_is_one_line_through_the_cli(raw_copy, tmp_path, capsys):
    truncated = raw_copy / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    line = _fails(fit_args(raw_copy, tmp_path, *TINY_RUN), capsys)
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
    args = fit_args(tmp_path / "data", tmp_path, *TINY_RUN, "--data.source_dir=/nonexistent")
    args.append(f"{option}={path}")
    line = _fails(args, capsys)
    assert line.startswith("error: " + phrase.format(path=path)), line
    assert "Not a directory" in line and "pass a writable " + option in line
    assert blocker.read_text() == "keep me"
