"""``python -m fashion_lightning runs``: one row a run, read from what real runs wrote."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fashion_lightning.cli import main
from fashion_lightning.run_folders import RunFolderLogger
from fashion_lightning.run_records import RunRecord, read_run
from fashion_lightning.runs_plot import TENSORBOARD_COLOURS, run_styles
from tests.helpers import ROOT, SHORT, TINY, fit_args, last_line, run_cli

pytestmark = pytest.mark.slow
ADAM = ROOT / "configs" / "adam.yaml"


def _runs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fashion_lightning", "runs", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _scalars(run, tag) -> list[float]:
    events = EventAccumulator(str(run))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def runs_root(data_dir, tmp_path_factory):
    """Real runs of two configs, one of them stopped; and folders a crash, a copy, a search or
    another tool left: what `runs` meets in a user's lightning_logs. (A killed and resumed run
    is read in tests/test_resume.py.)"""
    root = tmp_path_factory.mktemp("runs")
    main(fit_args(data_dir, root, *SHORT))  # sgd_0
    adam = fit_args(data_dir, root, *SHORT, "--model.optimizer.init_args.lr=0.001")
    adam[2] = str(ADAM)
    main(adam)  # adam_0
    stopped = run_cli(
        *fit_args(data_dir, root, *SHORT, "--trainer.max_epochs=3"),
        "--trainer.callbacks+=tests.helpers.SendSignalAt",
        f"--trainer.callbacks.signum={int(signal.SIGTERM)}",
        "--trainer.callbacks.step=40",
    )
    assert stopped.returncode == 143, stopped.stderr[-2000:]  # sgd_1, stopped in epoch 1
    killed = run_cli(
        *fit_args(data_dir, root, *SHORT),
        "--trainer.callbacks+=tests.helpers.KillAt",
        "--trainer.callbacks.step=3",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]  # sgd_2, in epoch 1

    runs = root / "lightning_logs"
    shutil.copytree(runs / "sgd_0", runs / "version_0")  # a run made before runs had names
    shutil.copytree(runs / "sgd_0", runs / "tune" / "mlp" / "trial_3")  # a search's trial
    torn = runs / "torn_0"  # a crash mid-write on another machine: its last record cut short
    torn.mkdir()
    events = min((runs / "sgd_0").glob("events.out.tfevents.*"))  # the fit's, not the test's
    stamp = events.name.split(".")[3]
    torn.joinpath(f"events.out.tfevents.{stamp}.elsewhere.1.0").write_bytes(
        events.read_bytes()[:-50]
    )
    foreign = runs / "notes"  # another tool's folder
    foreign.mkdir()
    (foreign / "config.yaml").write_text("{ not: yaml: at all")
    (foreign / "events.out.tfevents.1.host.1.0").write_bytes(b"\x00garbage" * 10)
    live = runs / "live_0"  # a run whose writer is this test's own process: still running
    live.mkdir()
    (
        live / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0"
    ).touch()
    return runs


def test_the_table_ranks_runs_and_says_what_each_is(runs_root):
    result = _runs("--root", str(runs_root))
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split()[:4] == ["run", "config", "epochs", "best"]
    rows = {line.split()[0]: line for line in lines}
    assert set(rows) == {
        "sgd_0",
        "sgd_1",
        "sgd_2",
        "adam_0",
        "version_0",
        "torn_0",
        "notes",
        "live_0",
        "tune/mlp/trial_3",
    }
    # best val/acc first: Adam at 1e-3 learns faster than the tutorial's SGD
    assert lines[0].startswith("adam_0")
    # what sets a run apart from the others: its values that are not the majority's
    assert "optimizer=Adam" in rows["adam_0"] and "optimizer" not in rows["sgd_0"]
    assert "max_epochs=3" in rows["sgd_1"] and "max_epochs" not in rows["sgd_0"]
    assert rows["adam_0"].split()[1] == "adam" and rows["version_0"].split()[1] == "-"
    assert rows["tune/mlp/trial_3"].split()[1] == "-"  # found two levels down, not a config
    assert " 2/2 " in rows["sgd_0"] and " finished " in rows["sgd_0"]
    last_train, gap = rows["sgd_0"].split()[5:7]  # the training images, the gap in points
    assert re.fullmatch(r"\d+\.\d\d%", last_train) and re.fullmatch(r"[+-]\d+\.\d\d", gap)
    assert " 1/3 " in rows["sgd_1"] and " stopped " in rows["sgd_1"]
    # killed in its first epoch: its events hold no epoch yet, and nothing continues it
    cells = rows["sgd_2"].split()
    assert cells[2:8] == ["0/2", "-", "-", "-", "-", "-"] and cells[9] == "failed", cells
    assert " running " in rows["live_0"]
    assert "failed (config: no config.yaml)" in rows["torn_0"]
    assert "%" in rows["torn_0"]  # what was written whole is read
    assert "config" in rows["notes"] and "events" in rows["notes"]  # listed with the reason
    assert " unreadable (" in rows["notes"]
    # a checkpoint's name counts epochs as the table does
    best = next((runs_root / "sgd_0" / "checkpoints").glob("epoch*.ckpt")).name
    assert best.startswith(f"epoch{int(rows['sgd_0'].split()[4]):02d}-"), (best, rows["sgd_0"])


def test_json_gives_the_numbers_the_events_hold(runs_root):
    result = _runs("--root", str(runs_root), "--json")
    assert result.returncode == 0, result.stderr
    runs = {run["run"]: run for run in json.loads(result.stdout)}
    sgd = runs["sgd_0"]
    val_acc = _scalars(runs_root / "sgd_0", "val/acc")
    assert sgd["best_val_acc"] == pytest.approx(max(val_acc))
    assert sgd["best_epoch"] == val_acc.index(max(val_acc)) + 1
    assert sgd["test_acc"] == pytest.approx(_scalars(runs_root / "sgd_0", "test/acc")[-1])
    assert sgd["epochs_done"] == sgd["epochs_planned"] == 2 and sgd["state"] == "finished"
    # the training images at the last validation, and their gap to val/acc there
    train = _scalars(runs_root / "sgd_0", "train_eval/acc")
    assert sgd["last_train_acc"] == pytest.approx(train[-1])
    assert sgd["last_gap"] == pytest.approx(train[-1] - val_acc[-1], abs=1e-6)
    assert 0 < sgd["wall_seconds"] < 600
    assert sgd["differs"]["optimizer"] == "SGD" and runs["adam_0"]["differs"]["optimizer"] == "Adam"
    assert runs["version_0"]["best_val_acc"] == sgd["best_val_acc"]


def test_csv_has_a_column_per_differing_setting(runs_root):
    result = _runs("--root", str(runs_root), "--csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 9
    assert {"run", "config", "optimizer", "best_val_acc", "test_acc", "state"} <= set(rows[0])
    assert "data_dir" not in rows[0] and "default_root_dir" not in rows[0]  # where, not what


def test_the_plot_draws_the_runs_against_epochs(runs_root, tmp_path):
    picture = tmp_path / "runs.png"
    result = _runs("--root", str(runs_root), "--plot", str(picture))
    assert result.returncode == 0, result.stderr
    with Image.open(picture) as image:
        assert image.size == (1500, 800)
        assert len(image.getcolors(1 << 20) or []) > 50  # lines drawn, not an empty frame


def test_a_missing_root_or_unknown_flag_is_one_line(tmp_path):
    missing = _runs("--root", str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert last_line(missing.stderr).startswith(f"error: --root {tmp_path / 'nowhere'}: no such")
    assert len(missing.stderr.strip().splitlines()) == 1
    file = _runs("--root", "README.md")
    assert file.returncode == 1 and len(file.stderr.strip().splitlines()) == 1
    assert last_line(file.stderr).startswith("error: --root README.md: a file, not a folder;")
    unknown = _runs("--sort", "name")
    assert unknown.returncode == 2 and "--help" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_a_rerun_of_a_runs_own_config_keeps_its_name(runs_root, data_dir, tmp_path):
    config = runs_root / "adam_0" / "config.yaml"
    main(
        [
            "fit",
            f"--config={config}",
            f"--data.data_dir={data_dir}",
            f"--trainer.default_root_dir={tmp_path}",
            *TINY,
        ]
    )
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["adam_0"]


def test_ckpt_path_last_takes_the_newest_run_of_the_config(runs_root, data_dir, tmp_path):
    # sgd_1 was written last; the adam config's newest run is adam_0
    shutil.copytree(runs_root, tmp_path / "lightning_logs", ignore=shutil.ignore_patterns("live_0"))
    args = fit_args(data_dir, tmp_path, *TINY, "--ckpt_path=last")
    args[0], args[2] = "validate", str(ADAM)
    main(args)
    saved = (tmp_path / "lightning_logs" / "adam_1" / "config.yaml").read_text()
    assert f"{tmp_path / 'lightning_logs' / 'adam_0' / 'checkpoints' / 'last.ckpt'}" in saved


def _logged_run(root, name, writes, max_epochs=2):
    """A run folder holding what a logger was handed, ``writes`` of (metrics, step)."""
    logger = RunFolderLogger(root, run_name=name)
    for metrics, step in writes:
        logger.log_metrics(metrics, step)
    logger.finalize("success")
    folder = root / "lightning_logs" / f"{name}_0"
    (folder / "config.yaml").write_text(f"trainer:\n  max_epochs: {max_epochs}\n")
    return folder


def test_epochs_count_training_epochs_whatever_the_validations(tmp_path):
    """Two validations an epoch (val_check_interval 0.5): two epochs, not four; the best
    validation, half-way through the second epoch, came in epoch 2."""
    writes = []
    for epoch in range(2):
        middle, end = 32 * epoch + 16, 32 * epoch + 32
        writes.append(({"val/acc": 0.6 + epoch / 10 + 0.05}, middle))  # no epoch: mid-epoch
        writes.append(({"val/acc": 0.6 + epoch / 10, "epoch": float(epoch)}, end))
        writes.append(({"train/acc": 0.5, "epoch": float(epoch)}, end))
    writes.append(({"train/acc": 0.55}, 72))  # max_steps ended a third epoch early
    record = read_run(_logged_run(tmp_path, "sgd", writes), tmp_path / "lightning_logs")
    assert (record.epochs_done, record.state) == (2, "finished")
    assert (record.best_val_acc, record.best_epoch) == (pytest.approx(0.75), 2)


def test_a_validate_commands_folder_is_evaluated_not_failed(tmp_path):
    folder = _logged_run(tmp_path, "sgd", [({"val/acc": 0.7}, 0)], max_epochs=10)
    result = _runs("--root", str(tmp_path))  # the default_root_dir: its lightning_logs is read
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[1].split()
    assert row[:4] == ["lightning_logs/sgd_0", "sgd", "-", "70.00%"] and "evaluated" in row
    assert read_run(folder, tmp_path / "lightning_logs").state == "evaluated"


def test_a_run_folder_as_the_root_lists_that_run(runs_root):
    result = _runs("--root", str(runs_root / "adam_0"))
    assert result.returncode == 0, result.stderr
    _, *lines = result.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [["adam_0", "adam", "2/2"]]
    assert "finished" in lines[0]


def test_a_run_is_listed_once_whatever_links_to_it(runs_root, tmp_path):
    root = tmp_path / "lightning_logs"
    shutil.copytree(runs_root / "adam_0", root / "adam_0")
    (root / "aa_adam").symlink_to(root / "adam_0")  # sorts before the run it names
    (root / "sgd_0").symlink_to(runs_root / "sgd_0")  # a run kept elsewhere: listed
    (root / "same_sgd").symlink_to(runs_root / "sgd_0")
    (root / "loop").symlink_to(root)  # a link to the root itself: not walked again
    (root / "nested").mkdir()
    (root / "nested" / "up").symlink_to(root)
    result = _runs("--root", str(root), "--json")
    assert result.returncode == 0, result.stderr
    names = sorted(run["run"] for run in json.loads(result.stdout))
    assert names[0] == "adam_0" and len(names) == 2, names
    assert names[1] in ("same_sgd", "sgd_0")


def test_a_plot_with_no_runs_is_an_error_and_writes_nothing(tmp_path):
    (tmp_path / "lightning_logs").mkdir()
    picture = tmp_path / "runs.png"
    result = _runs("--root", str(tmp_path / "lightning_logs"), "--plot", str(picture))
    assert result.returncode == 1
    assert last_line(result.stderr) == (
        f"error: --plot {picture}: no run here has a val/acc to draw; nothing was written"
    )
    assert not picture.exists()


def test_each_config_keeps_one_colour_in_the_order_tensorboard_gives_them():
    started = {"sgd_0": 1.0, "adam_0": 2.0, "sgd_1": 3.0, "best_0": 4.0, "tune/mlp/trial_3": 5.0}
    records = [RunRecord(name, Path(name), started=time) for name, time in started.items()]
    styles = run_styles(records)
    assert styles["sgd_0"] == (TENSORBOARD_COLOURS[0], "-")
    assert styles["sgd_1"] == (TENSORBOARD_COLOURS[0], "--")  # the config's second run
    assert styles["adam_0"][0] == TENSORBOARD_COLOURS[1]
    assert styles["best_0"][0] == TENSORBOARD_COLOURS[2]
    assert styles["tune/mlp/trial_3"][0] == TENSORBOARD_COLOURS[3]


def test_a_predict_commands_folder_is_evaluated_not_failed(tmp_path):
    # predict logs no values: its folder holds its config and predictions.csv
    folder = _logged_run(tmp_path, "sgd", [], max_epochs=10)
    (folder / "predictions.csv").write_text("index,true_label,predicted_label\n0,9,9\n")
    assert read_run(folder, tmp_path / "lightning_logs").state == "evaluated"
    (folder / "predictions.csv").unlink()  # logged nothing and wrote nothing: no evaluation
    assert read_run(folder, tmp_path / "lightning_logs").state != "evaluated"


def test_a_reader_that_stops_early_is_no_traceback(runs_root):
    # `runs --json | head -1`: the reader closes the pipe while runs writes (here, at once)
    command = [sys.executable, "-m", "fashion_lightning", "runs", "--root", str(runs_root)]
    reader = subprocess.Popen(
        [*command, "--json"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    reader.stdout.close()
    _, stderr = reader.communicate(timeout=60)
    assert reader.returncode == 1 and stderr == b""
