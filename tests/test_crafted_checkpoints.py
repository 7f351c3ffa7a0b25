"""A checkpoint someone hands over is data: whatever it holds, it deletes nothing outside the
run's own checkpoint files, is read once as the bytes that were checked, and anything it holds
that Lightning would choke on is one line before anything runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fashion_lightning.cli import main
from fashion_lightning.run_checkpoints import ResumableCheckpointIO
from tests.helpers import ROOT, TINY, cli_in_process, fit_args, last_line

pytestmark = pytest.mark.slow  # fits for the checkpoints, and processes that could delete


@pytest.fixture(scope="module")
def good_run(data_dir, tmp_path_factory) -> Path:
    """A real run folder of this project, one short epoch, relative to its root."""
    root = tmp_path_factory.mktemp("good")
    main(fit_args(data_dir, root, *TINY, "--model.steps_per_call=1"))
    return root / "lightning_logs" / "sgd_0"


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _checkpoint_state(checkpoint: dict) -> dict:
    return next(v for k, v in checkpoint["callbacks"].items() if "Checkpoint" in k)


def _command(args: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in this process; its exit code and its one error line."""
    code, err = cli_in_process(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1, errors
    return code, errors[0] if errors else ""


def _fit_in(folder: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """``fit`` of the tutorial in a new process whose working folder is ``folder``: the
    relative paths a crafted checkpoint names are taken from there."""
    args = fit_args(data_dir, ".", *TINY, "--trainer.max_epochs=3", "--model.steps_per_call=1")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "fashion_lightning", *args, *extra],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _precious(folder: Path) -> Path:
    """A folder of the user's, with a file, next to where runs are written."""
    precious = folder / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    return precious


@pytest.mark.parametrize(
    ("named", "phrase"),
    [
        # the attack: text that starts with the folder, then leads out of it
        ("lightning_logs/sgd_0/checkpoints/../../../precious", "is not a .ckpt file"),
        ("lightning_logs/sgd_0/checkpoints/../../../precious/x.ckpt", "leads out of its folder"),
        ("{folder}/precious/thesis.ckpt", "is not inside the run's checkpoint folder"),
        ("lightning_logs/sgd_0/checkpoints/precious.ckpt", "is not inside the run's"),  # a link
        ("lightning_logs/sgd_0/checkpoints/folder.ckpt", "is a folder"),
        ("file://{folder}/precious/x.ckpt", "is a URL, not a local file"),
        ("memory://precious/x.ckpt", "is a URL, not a local file"),
    ],
    ids=[
        "dot-dot-folder",
        "dot-dot-file",
        "absolute",
        "link-out",
        "a-folder",
        "file-url",
        "memory",
    ],
)
def test_a_checkpoint_cannot_make_a_run_delete_anything_but_its_own_checkpoints(
    named, phrase, good_run, data_dir, tmp_path
):
    precious = _precious(tmp_path)
    named = named.format(folder=tmp_path)
    handed = tmp_path / "lightning_logs" / "sgd_0"  # a run folder someone hands over
    (handed / "checkpoints").mkdir(parents=True)
    (handed / "checkpoints" / "precious.ckpt").symlink_to(precious)
    (handed / "checkpoints" / "folder.ckpt").mkdir()
    checkpoint = _load(good_run / "checkpoints" / "last.ckpt")
    _checkpoint_state(checkpoint).update(
        dirpath="lightning_logs/sgd_0/checkpoints",
        best_k_models={named: torch.tensor(0.0)},
        kth_best_model_path=named,
        kth_value=torch.tensor(0.0),
        best_model_score=torch.tensor(0.0),
        best_model_path="",
        last_model_path="lightning_logs/sgd_0/checkpoints/last.ckpt",
    )
    torch.save(checkpoint, handed / "checkpoints" / "last.ckpt")
    torch.save(checkpoint, tmp_path / "downloaded.ckpt")
    before = sorted(p.name for p in (tmp_path / "lightning_logs").iterdir())
    for ckpt_path in ("downloaded.ckpt", "last"):
        result = _fit_in(tmp_path, data_dir, f"--ckpt_path={ckpt_path}")
        assert result.returncode == 1, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        line = last_line(result.stderr)
        assert line.startswith("error: --ckpt_path ") and "callbacks.RunCheckpoint." in line
        assert phrase in line and line.endswith("(nothing was run)"), line
        assert (precious / "thesis.tex").read_text() == "years of work"
        assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == before


def test_a_state_that_names_files_without_their_folder_is_refused(
    good_run, data_dir, tmp_path, capsys
):
    checkpoint = _load(good_run / "checkpoints" / "last.ckpt")
    del _checkpoint_state(checkpoint)["dirpath"]  # Lightning would restore it into any folder
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    args = fit_args(data_dir, tmp_path / "runs", *TINY, f"--ckpt_path={tmp_path / 'crafted.ckpt'}")
    code, line = _command(args, capsys)
    assert code == 1 and ".dirpath: is missing, and the state names checkpoint files" in line
    assert not (tmp_path / "runs").exists()


def test_a_replaced_checkpoint_is_removed_as_a_file_never_as_a_folder(tmp_path):
    io = ResumableCheckpointIO()
    outside = _precious(tmp_path)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "old.ckpt").write_bytes(b"x")
    (folder / "dir.ckpt").mkdir()
    (folder / "dir.ckpt" / "inside").write_text("kept")
    (folder / "link.ckpt").symlink_to(outside)
    (folder / "notes.txt").write_text("kept")
    for name in ("old.ckpt", "dir.ckpt", "link.ckpt", "notes.txt", "missing.ckpt"):
        io.remove_checkpoint(folder / name)
    assert sorted(p.name for p in folder.iterdir()) == ["dir.ckpt", "notes.txt"]
    assert (folder / "dir.ckpt" / "inside").read_text() == "kept"
    assert (outside / "thesis.tex").read_text() == "years of work"  # the link went, not this


def test_a_run_still_removes_the_checkpoints_it_replaced(data_dir, tmp_path):
    main(
        fit_args(
            data_dir,
            tmp_path,
            "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=10",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            "--model.optimizer.init_args.lr=0.1",
            "--checkpoint.monitor=epoch",  # each epoch is better than the last: each replaces
            "--model.steps_per_call=1",
        )
    )
    kept = sorted((tmp_path / "lightning_logs" / "sgd_0" / "checkpoints").iterdir())
    assert [p.name for p in kept].count("last.ckpt") == 1 and len(kept) == 2
    assert [_load(p)["epoch"] for p in kept] == [2, 2]  # the best is the last epoch's alone


def test_a_configured_checkpoint_io_writes_but_never_reads_a_checkpoint(data_dir, tmp_path, capsys):
    marker = tmp_path / "read"
    plugin = [
        "--trainer.plugins=tests.helpers.ReadingCheckpointIO",
        f"--trainer.plugins.marker={marker}",
    ]
    args = fit_args(data_dir, tmp_path, *TINY, "--model.steps_per_call=1", *plugin)
    assert _command(args, capsys) == (0, "")
    last = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"
    assert _load(last)["global_step"] == 3
    # a resume reads the file the project checked, as it read it: not through the plugin
    assert _command([*args, "--trainer.max_epochs=2", "--ckpt_path=last"], capsys) == (0, "")
    assert _load(last)["global_step"] == 6 and not marker.exists()


def test_an_asynchronous_checkpoint_io_writes_checkpoints_that_resume(data_dir, tmp_path, capsys):
    args = fit_args(data_dir, tmp_path, *TINY, "--trainer.plugins=AsyncCheckpointIO")
    assert _command(args, capsys) == (0, "")
    assert _command([*args, "--trainer.max_epochs=2", "--ckpt_path=last"], capsys) == (0, "")
    last = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"
    assert _load(last)["epoch"] == 1


@pytest.mark.parametrize(
    "url",
    [
        "data:application/octet-stream;base64,gASVAAAAAAAAAAA=",
        "memory://run/last.ckpt",
        "file:///tmp/last.ckpt",
        "s3://bucket/last.ckpt",
        "simplecache::file:///tmp/last.ckpt",
    ],
)
def test_a_url_is_not_a_checkpoint_path(url, data_dir, tmp_path, capsys):
    args = fit_args(data_dir, tmp_path, *TINY, f"--ckpt_path={url}")
    code, line = _command(args, capsys)
    assert code == 1 and line.startswith(f"error: --ckpt_path {url}: is a URL, not a local file")
    assert not (tmp_path / "lightning_logs").exists()


def test_a_local_file_named_like_a_url_is_read_as_a_local_file(
    good_run, data_dir, tmp_path, monkeypatch, capsys
):
    # the attack: a data: URL that holds a pickle, and a real checkpoint at its text
    marker = tmp_path / "ran"
    monkeypatch.chdir(tmp_path)
    name = "data:application;base64,Y29zCnN5c3RlbQ=="
    Path(name).write_bytes((good_run / "checkpoints" / "last.ckpt").read_bytes())
    plugin = "--trainer.plugins=lightning.fabric.plugins.TorchCheckpointIO"
    base = fit_args(data_dir, tmp_path, *TINY, "--trainer.max_epochs=2", plugin)
    code, line = _command([*base, "--weights_only=false", f"--ckpt_path=./{name}"], capsys)
    assert code == 2 and "weights_only takes true or null only" in line
    code, line = _command([*base, f"--ckpt_path={name}"], capsys)
    assert code == 1 and "is a URL, not a local file" in line and f"./{name}" in line
    assert _command([*base, f"--ckpt_path=./{name}"], capsys) == (0, "")
    assert not marker.exists()


def test_weights_only_cannot_be_turned_off_by_a_config(data_dir, tmp_path, capsys):
    config = tmp_path / "handed.yaml"
    config.write_text("weights_only: false\n")
    args = fit_args(data_dir, tmp_path, *TINY, "--config", str(config))
    code, line = _command(args, capsys)
    assert code == 2 and "weights_only takes true or null only" in line
    assert not (tmp_path / "lightning_logs").exists()


def _resume_state(checkpoint: dict) -> dict:
    return checkpoint["callbacks"]["ResumableTraining"]


def _mid_epoch(checkpoint: dict) -> None:
    _resume_state(checkpoint).update(epoch_finished=False, images_done=64)


CRAFTED = {
    "callbacks-a-string": (lambda c: c.update(callbacks="x"), "callbacks: is a str, not a mapping"),
    "data-a-string": (
        lambda c: c.update(datamodule_hyper_parameters="x"),
        "datamodule_hyper_parameters: is a str, not a mapping",
    ),
    "images-done-text": (
        lambda c: _resume_state(c).update(images_done="x"),
        "callbacks.ResumableTraining.images_done: 'x' is not a count",
    ),
    "loops-missing": (
        lambda c: c.pop("loops"),
        "loops: is missing: the checkpoint does not say where training stood",
    ),
    "loops-a-string": (lambda c: c.update(loops="x"), "loops: is a str, not a mapping"),
    "loops-garbage": (
        lambda c: c["loops"]["fit_loop"]["epoch_progress"].update(total="x"),
        "loops.fit_loop.epoch_progress.total: is a str, not a mapping",
    ),
    "loop-count-negative": (
        lambda c: c["loops"]["fit_loop"]["epoch_progress"]["total"].update(ready=-3),
        "loops.fit_loop.epoch_progress.total.ready: is not a count",
    ),
    # Lightning decides from these where a resumed epoch stands, and takes any
    "loop-completed-past-ready": (
        lambda c: c["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"].update(
            completed=10**6
        ),
        "loops.fit_loop.epoch_loop.batch_progress.total.completed: 1000000 is more than processed",
    ),
    "loop-started-past-ready": (
        lambda c: c["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"].update(started=50),
        "loops.fit_loop.epoch_loop.batch_progress.current.started: 50 is more than ready",
    ),
    "loop-key-foreign": (
        lambda c: c["loops"]["fit_loop"]["epoch_progress"]["total"].update(evil=1),
        "loops.fit_loop.epoch_progress.total.evil: is not a key that Lightning writes there",
    ),
    "optimizer-states-a-string": (
        lambda c: c.update(optimizer_states="x"),
        "optimizer_states: is a str, not a list",
    ),
    "optimizer-two": (
        lambda c: c["optimizer_states"].append(c["optimizer_states"][0]),
        "optimizer_states: holds 2 optimizers; the model has one",
    ),
    "optimizer-wrong-size": (
        lambda c: c["optimizer_states"][0]["state"].update(
            {0: {"momentum_buffer": torch.zeros(3)}}
        ),
        "optimizer_states.0.state.0.momentum_buffer: has shape (3,), not the parameter's (512, 784)",
    ),
    "optimizer-group-params": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(params=[0]),
        "optimizer_states.0.param_groups.0.params: does not match the model's parameters",
    ),
    "optimizer-lr-text": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(lr="x"),
        "optimizer_states.0.param_groups.0.lr: is not a number",
    ),
    "optimizer-lr-negative": (  # gradient ascent, which SGD's constructor refuses
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(lr=-0.1),
        "optimizer_states.0.param_groups.0: Invalid learning rate: -0.1",
    ),
    "optimizer-maximize": (  # gradient ascent again, by a setting torch takes as it is
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(maximize=True),
        "optimizer_states.0.param_groups.0.maximize: is True, where the optimizer the run's "
        "config builds has False",
    ),
    "optimizer-lr-other": (  # sgd.yaml has no scheduler: the rate is the config's
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(lr=5.0),
        "optimizer_states.0.param_groups.0.lr: is 5.0, where the optimizer the run's config",
    ),
    "optimizer-momentum-two": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(momentum=2.0),
        "optimizer_states.0.param_groups.0.momentum: is 2.0",
    ),
    "rng-3-bytes": (
        lambda c: _resume_state(c)["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
        "callbacks.ResumableTraining.rng.torch: is not the 5056 bytes",
    ),
    "rng-not-a-generator-state": (  # the right size, but no Mersenne Twister state
        lambda c: _resume_state(c)["rng"].update(torch=torch.zeros(5056, dtype=torch.uint8)),
        "callbacks.ResumableTraining.rng.torch: is not a state a CPU generator can take",
    ),
    "resume-epoch-differs": (
        lambda c: _resume_state(c).update(epoch=7),
        "callbacks.ResumableTraining.epoch: 7 is not the checkpoint's epoch",
    ),
    "weights-nan": (
        lambda c: c["state_dict"]["model.linear_relu_stack.4.bias"].fill_(float("nan")),
        "state_dict.model.linear_relu_stack.4.bias: holds NaN or infinite values",
    ),
    "averaged-weights-infinite": (
        lambda c: c.update(
            current_model_state={
                k: v.clone().fill_(float("inf")) if v.is_floating_point() else v
                for k, v in c["state_dict"].items()
            }
        ),
        "current_model_state.model.linear_relu_stack.0.weight: holds NaN or infinite values",
    ),
    "weights-sparse": (
        lambda c: c["state_dict"].update(
            {"model.linear_relu_stack.4.bias": torch.zeros(10).to_sparse()}
        ),
        "is a torch.sparse_coo tensor, not a dense one",
    ),
    "metric-count-negative": (
        lambda c: c["state_dict"]["train_acc.tp"].fill_(-5),
        "state_dict.train_acc.tp: holds negative counts",
    ),
    "best-accuracy-text": (
        lambda c: c["callbacks"]["HParamsSummary"].update(best="x"),
        "callbacks.HParamsSummary.best: 'x' is not an accuracy",
    ),
    "best-accuracy-past-one": (  # shown as the run's best in TensorBoard's HParams
        lambda c: c["callbacks"]["HParamsSummary"].update(best=5.0),
        "callbacks.HParamsSummary.best: 5.0 is not an accuracy (a fraction, 0 to 1)",
    ),
    "best-epoch-in-the-future": (
        lambda c: c["callbacks"]["HParamsSummary"].update(best_epoch=10**9),
        "callbacks.HParamsSummary.best_epoch: 1000000000 is past the checkpoint's epoch (1)",
    ),
    "checkpoint-score-nan": (
        lambda c: next(v for k, v in c["callbacks"].items() if "Checkpoint" in k).update(
            best_model_score=torch.tensor(float("nan"))
        ),
        ".best_model_score: is not a score",
    ),
    "cross-entropy-nan": (
        lambda c: c.update(train_cross_entropy={"images": 64, "sum": float("nan")}),
        "train_cross_entropy is not the two numbers this project writes",
    ),
    "steps-per-call-0": (
        lambda c: (_mid_epoch(c), c["hyper_parameters"].update(steps_per_call=0)),
        "hyper_parameters.steps_per_call: 0 is not a positive whole number",
    ),
    "steps-per-call-text": (
        lambda c: (_mid_epoch(c), c["hyper_parameters"].update(steps_per_call="x")),
        "hyper_parameters.steps_per_call: 'x' is not a positive whole number",
    ),
    "epoch-text": (lambda c: c.update(epoch="x"), "epoch: 'x' is not a count"),
    "version-text": (
        lambda c: c.update({"pytorch-lightning_version": "x"}),
        "pytorch-lightning_version: 'x' is not a version",
    ),
    "scheduler-without-one": (
        lambda c: c.update(lr_schedulers=[{"last_epoch": 1}]),
        "lr_schedulers: holds 1 schedulers; the model has none",
    ),
    "averaged-weights-of-another-model": (
        lambda c: c.update(current_model_state={"x": torch.zeros(1)}),
        "a checkpoint of another model",
    ),
}


@pytest.mark.parametrize("crafted", sorted(CRAFTED))
def test_a_crafted_entry_is_one_line_before_anything_runs(
    crafted, good_run, data_dir, tmp_path, capsys
):
    craft, phrase = CRAFTED[crafted]
    checkpoint = _load(good_run / "checkpoints" / "last.ckpt")
    craft(checkpoint)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    args = fit_args(
        data_dir, tmp_path / "runs", *TINY, "--trainer.max_epochs=2", f"--ckpt_path={path}"
    )
    code, line = _command(args, capsys)
    assert code == 1 and line.startswith(f"error: --ckpt_path {path}: "), line
    assert phrase in line, line
    assert not (tmp_path / "runs").exists()  # no run folder, no config file


@pytest.mark.parametrize(
    ("crafted", "phrase"),
    [
        ("callbacks", "callbacks: is a str, not a mapping"),
        ("hidden_size", 'hyper_parameters: Parser key "model.hidden_size": Not of type HiddenSize'),
    ],
)
def test_a_crafted_checkpoint_to_test_is_one_line(
    crafted, phrase, good_run, data_dir, tmp_path, capsys
):
    checkpoint = _load(good_run / "checkpoints" / "last.ckpt")
    if crafted == "callbacks":
        checkpoint["callbacks"] = "x"
    else:
        checkpoint["hyper_parameters"]["hidden_size"] = 10**12  # would allocate 3 PB
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    args = ["test", *fit_args(data_dir, tmp_path / "runs", *TINY)[1:], f"--ckpt_path={path}"]
    code, line = _command(args, capsys)
    assert code == 1 and line.startswith(f"error: --ckpt_path {path}: ") and phrase in line, line
    assert not (tmp_path / "runs").exists()


def test_an_entry_no_check_foresaw_is_one_line_and_leaves_no_run_folder(
    good_run, data_dir, tmp_path, capsys
):
    # a progress count Lightning takes and fails on later, in its own words
    checkpoint = _load(good_run / "checkpoints" / "last.ckpt")
    del checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    args = fit_args(data_dir, tmp_path, *TINY, "--trainer.max_epochs=2", f"--ckpt_path={path}")
    code, line = _command(args, capsys)
    assert code == 1 and "Lightning could not restore it (KeyError: 'current')" in line, line
    assert not (tmp_path / "lightning_logs").exists()


def test_images_done_past_the_epoch_are_one_line_and_leave_no_run_folder(
    good_run, data_dir, tmp_path, capsys
):
    # checked once the data knows an epoch's size: the epoch would end at once, training less
    checkpoint = _load(good_run / "checkpoints" / "last.ckpt")
    _resume_state(checkpoint).update(epoch_finished=False, images_done=10**15)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    args = fit_args(data_dir, tmp_path, *TINY, "--trainer.max_epochs=2", f"--ckpt_path={path}")
    code, line = _command(args, capsys)
    assert code == 1 and line.startswith(f"error: --ckpt_path {path}: "), line
    assert (
        "callbacks.ResumableTraining.images_done: 1000000000000000 images of its epoch were "
        "done, more than the 192 of an epoch of this run" in line
    ), line
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize(
    ("crafted", "ckpt_path", "phrase"),
    [
        ("global-step", "last", "global_step: 'x' is not a count"),
        ("best-path", "best", "best_model_path: 5 is not a path"),
        ("events", "last", ""),
    ],
)
def test_a_handed_run_folder_with_crafted_records_is_one_line(
    crafted, ckpt_path, phrase, good_run, data_dir, tmp_path, capsys
):
    import shutil

    run = tmp_path / "lightning_logs" / "sgd_0"
    shutil.copytree(good_run, run)
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = _load(last)
    if crafted == "global-step":
        checkpoint["global_step"] = "x"
    elif crafted == "best-path":
        _checkpoint_state(checkpoint)["best_model_path"] = 5
    torch.save(checkpoint, last)
    if crafted == "events":  # one damaged TensorBoard record: the resume's purge-step reader
        events = sorted(run.glob("events.out.tfevents.*"))[0]
        data = bytearray(events.read_bytes())
        data[60:70] = b"\xff" * 10
        events.write_bytes(bytes(data))
    args = fit_args(data_dir, tmp_path, *TINY, "--trainer.max_epochs=2", f"--ckpt_path={ckpt_path}")
    code, line = _command(args, capsys)
    if crafted == "events":
        assert code == 0  # the resume reads what it can; TensorBoard skips the damaged record
        assert _load(last)["epoch"] == 1
    else:
        assert code == 1 and phrase in line, line


def test_an_old_format_checkpoint_names_no_file_outside_either(good_run, data_dir, tmp_path):
    """Lightning upgrades a checkpoint of an old Lightning as it loads it (old top-level keys
    go into ModelCheckpoint's state): the checks see the upgraded checkpoint."""
    precious = _precious(tmp_path)
    (precious / "model.ckpt").write_text("mine")
    checkpoint = _load(good_run / "checkpoints" / "last.ckpt")
    checkpoint.pop("loops")
    checkpoint["pytorch-lightning_version"] = "0.9.0"
    checkpoint["checkpoint_callback_best_model_path"] = (
        "lightning_logs/sgd_1/checkpoints/../../../precious/model.ckpt"
    )
    checkpoint["checkpoint_callback_best_model_score"] = 0.0
    torch.save(checkpoint, tmp_path / "downloaded.ckpt")
    result = _fit_in(
        tmp_path, data_dir, "--ckpt_path=downloaded.ckpt", "--trainer.callbacks+=ModelCheckpoint"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        "callbacks.<class 'lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint'>"
        in last_line(result.stderr)
    )
    assert (precious / "model.ckpt").read_text() == "mine"


def test_a_state_is_trusted_with_the_files_of_its_own_folder_only(good_run, data_dir, tmp_path):
    """A folder several runs share (no logger: <root>/checkpoints): a downloaded checkpoint
    whose state names another run's checkpoint there starts a run that leaves it alone."""
    shared = tmp_path / "checkpoints"
    shared.mkdir()
    other_run = shared / "epoch01-val_acc0.1700.ckpt"
    other_run.write_text("another run's")
    checkpoint = _load(good_run / "checkpoints" / "last.ckpt")
    _checkpoint_state(checkpoint).update(
        dirpath="checkpoints",
        best_k_models={"checkpoints/epoch01-val_acc0.1700.ckpt": torch.tensor(0.0)},
        kth_best_model_path="checkpoints/epoch01-val_acc0.1700.ckpt",
        best_model_path="checkpoints/epoch01-val_acc0.1700.ckpt",
        last_model_path="checkpoints/last.ckpt",
        kth_value=torch.tensor(0.0),
        best_model_score=torch.tensor(0.0),
    )
    torch.save(checkpoint, tmp_path / "downloaded.ckpt")
    result = _fit_in(tmp_path, data_dir, "--ckpt_path=downloaded.ckpt", "--trainer.logger=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert other_run.read_text() == "another run's"


def test_a_link_at_the_temporary_name_is_replaced_not_written_through(tmp_path):
    from fashion_lightning.files import atomic_write

    outside = tmp_path / "keep.txt"
    outside.write_text("mine")
    target = tmp_path / "run" / "last.ckpt"
    target.parent.mkdir()
    (target.parent / f".last.ckpt.{os.getpid()}.part").symlink_to(outside)
    with atomic_write(target) as f:
        f.write(b"checkpoint")
    assert outside.read_text() == "mine" and target.read_bytes() == b"checkpoint"


def test_a_continued_run_folder_with_a_link_is_refused(good_run, data_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "lightning_logs" / "sgd_0"
    shutil.copytree(good_run, run)
    outside = tmp_path / "outside.yaml"
    outside.write_text("mine")
    (run / "hparams.yaml").unlink()
    (run / "hparams.yaml").symlink_to(outside)
    args = fit_args(data_dir, tmp_path, *TINY, "--trainer.max_epochs=2", "--ckpt_path=last")
    code, line = _command(args, capsys)
    assert code == 1 and "hparams.yaml is a symbolic link in the run folder" in line, line
    assert outside.read_text() == "mine"


@pytest.mark.parametrize(
    ("option", "phrase"),
    [
        (
            ["--trainer.callbacks+=OnExceptionCheckpoint", "--trainer.callbacks.dirpath=precious"],
            "--trainer.callbacks OnExceptionCheckpoint: this project keeps the state of a stop",
        ),
        (
            ["--checkpoint.enable_version_counter=false"],
            "--checkpoint.enable_version_counter false: a checkpoint would be written over",
        ),
        (
            [
                "--trainer.logger=CSVLogger",
                "--trainer.logger.save_dir=precious",
                "--trainer.logger.name=",
                "--trainer.logger.version=",
            ],
            "holds files already (another run's, or yours); a new run logs into a new folder",
        ),
    ],
    ids=["on-exception-checkpoint", "version-counter", "logger-into-a-full-folder"],
)
def test_a_config_cannot_make_a_run_write_over_files(
    option, phrase, data_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    precious = _precious(tmp_path)
    (precious / "metrics.csv").write_text("mine")
    code, line = _command(fit_args(data_dir, "runs", *TINY, *option), capsys)
    assert code == 2 and phrase in line, line
    assert (precious / "metrics.csv").read_text() == "mine"
    assert sorted(p.name for p in precious.iterdir()) == ["metrics.csv", "thesis.tex"]


BEST = ROOT / "configs" / "best.yaml"  # AdamW, a one-cycle schedule, a weight average


@pytest.fixture(scope="module")
def good_schedule_run(data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good-best")
    main([*fit_args(data_dir, root, *TINY, "--model.steps_per_call=1"), "--config", str(BEST)])
    return root / "lightning_logs" / "sgd+best_0"


def _adam_state(checkpoint: dict) -> dict:
    return checkpoint["optimizer_states"][0]["state"][0]


CRAFTED_STEPS = {
    "schedule-past-its-end": (
        lambda c: c["lr_schedulers"][0].update(last_epoch=10**6),
        "lr_schedulers.0: cannot make a step (ValueError: Tried to step",
    ),
    "rate-not-the-scheduled-one": (  # the first step after the resume trained at it
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(lr=5.0),
        "optimizer_states.0.param_groups.0.lr: is 5.0, where the scheduler last set ",
    ),
    "schedule-step-negative": (  # the schedule ran backwards
        lambda c: c["lr_schedulers"][0].update(last_epoch=-5),
        "lr_schedulers.0.last_epoch: -5 is not a count of steps",
    ),
    "schedule-phase-of-no-length": (
        lambda c: c["lr_schedulers"][0]["_schedule_phases"][1].update(end_step=0),
        "lr_schedulers.0._schedule_phases: is [",
    ),
    "schedule-peak-not-a-number": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(max_lr=float("nan")),
        "optimizer_states.0.param_groups.0.max_lr: nan is not a finite number",
    ),
    "schedule-key-text": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(max_lr="x"),
        "optimizer_states.0.param_groups.0.max_lr: is not a number",
    ),
    "lr-nan": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(lr=float("nan")),
        "optimizer_states.0.param_groups.0.lr: nan is not a finite number",
    ),
    "beta-past-one": (  # a moving average that grows without bound
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(betas=(0.9, 5.0)),
        "optimizer_states.0.param_groups.0: Invalid beta parameter at index 1: 5.0",
    ),
    "cycled-momentum-past-one": (  # the first beta one-cycle sets at its peak
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(max_momentum=5.0),
        "optimizer_states.0.param_groups.0: Invalid beta parameter at index 0: 5.0",
    ),
    "weight-decay-negative": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(weight_decay=-1.0),
        "optimizer_states.0.param_groups.0: Invalid weight_decay value: -1.0",
    ),
    "step-a-bool": (
        lambda c: _adam_state(c).update(step=torch.tensor(True)),
        "optimizer_states.0.state.0.step: is not a torch.float32 tensor of shape ()",
    ),
    "moment-a-number": (
        lambda c: _adam_state(c).update(exp_avg=torch.tensor(0.0)),
        "optimizer_states.0.state.0.exp_avg: is not a torch.float32 tensor of shape (512, 784)",
    ),
    "moment-missing": (
        lambda c: _adam_state(c).pop("exp_avg_sq"),
        "optimizer_states.0.state.0.exp_avg_sq: is missing (the optimizer keeps it after a step)",
    ),
    # torch trained on with these, silently: a weight stopped for good, or NaN some steps later
    "squares-infinite": (
        lambda c: _adam_state(c)["exp_avg_sq"].fill_(float("inf")),
        "optimizer_states.0.state.0.exp_avg_sq: holds NaN or infinite values",
    ),
    "squares-negative": (
        lambda c: _adam_state(c)["exp_avg_sq"].fill_(-1.0),
        "optimizer_states.0.state.0.exp_avg_sq: holds negative values (it is an average of "
        "squares)",
    ),
    "moment-of-another-dtype": (
        lambda c: _adam_state(c).update(exp_avg=_adam_state(c)["exp_avg"].double()),
        "optimizer_states.0.state.0.exp_avg: is not a torch.float32 tensor of shape (512, 784)",
    ),
    "step-infinite": (
        lambda c: _adam_state(c)["step"].fill_(float("inf")),
        "optimizer_states.0.state.0.step: holds NaN or infinite values",
    ),
    "step-negative": (
        lambda c: _adam_state(c)["step"].fill_(-3.0),
        "optimizer_states.0.state.0.step: -3.0 is not a count of steps",
    ),
    "step-a-fraction": (
        lambda c: _adam_state(c)["step"].fill_(2.5),
        "optimizer_states.0.state.0.step: 2.5 is not a count of steps",
    ),
    "state-key-of-another-optimizer": (
        lambda c: _adam_state(c).update(momentum_buffer=torch.zeros(512, 784)),
        "optimizer_states.0.state.0.momentum_buffer: is not a key the model's optimizer writes",
    ),
}


@pytest.mark.parametrize("crafted", sorted(CRAFTED_STEPS))
def test_an_optimizer_or_schedule_state_that_cannot_step_is_one_line(
    crafted, good_schedule_run, data_dir, tmp_path, capsys
):
    craft, phrase = CRAFTED_STEPS[crafted]
    checkpoint = _load(good_schedule_run / "checkpoints" / "last.ckpt")
    craft(checkpoint)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    args = [
        *fit_args(data_dir, tmp_path / "runs", *TINY, "--model.steps_per_call=1"),
        "--config",
        str(BEST),
        f"--ckpt_path={path}",
    ]
    code, line = _command(args, capsys)
    assert code == 1 and line.startswith(f"error: --ckpt_path {path}: ") and phrase in line, line
    assert not (tmp_path / "runs").exists()
