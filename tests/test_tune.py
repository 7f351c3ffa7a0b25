"""The hyperparameter search, for real: Optuna studies of real fit runs, in real processes."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fashion_lightning.cli import main
from tests.helpers import ROOT, SGD_CONFIG, last_line

pytestmark = pytest.mark.slow

SPACE = {
    "model.optimizer.init_args.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True},
    "data.batch_size": {"type": "categorical", "choices": [32, 64]},
}
SHORT = (
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=5",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
)


def _space(folder: Path, space: dict | str = SPACE) -> Path:
    path = folder / "space.yaml"
    path.write_text(space if isinstance(space, str) else yaml.safe_dump(space))
    return path


def _args(data_dir, root, trials: int, *extra: str, space: Path | None = None) -> list[str]:
    return [
        "--config",
        str(SGD_CONFIG),
        "--search",
        str(space or _space(root)),
        "--trials",
        str(trials),
        "--startup_trials=1",
        "--pruner=none",  # a test of pruning asks for it: tiny trials are pruned by chance
        f"--data.data_dir={data_dir}",
        f"--trainer.default_root_dir={root}",
        *SHORT,
        *extra,
    ]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fashion_lightning.tune", *args]


def _tune(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _study(root: Path, name: str = "sgd") -> optuna.Study:
    journal = root / "lightning_logs" / "tune" / name / "study.journal"
    return optuna.load_study(
        study_name=name, storage=JournalStorage(JournalFileBackend(str(journal)))
    )


def _hparams_columns(events: EventAccumulator) -> dict:
    """TensorBoard's HParams columns of a run, in order, with the run's values."""
    content = events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    names = [
        info.name
        for info in plugin_data_pb2.HParamsPluginData.FromString(content).experiment.hparam_infos
    ]
    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {
        name: values[name].number_value
        if values[name].HasField("number_value")
        else values[name].string_value
        for name in names
    }


def _states(study: optuna.Study) -> list[TrialState]:
    return [trial.state for trial in study.get_trials()]


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_search_runs_trials_in_their_folders_and_writes_a_runnable_best_config(
    data_dir, tmp_path, capsys
):
    result = _tune(*_args(data_dir, tmp_path, 3))
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "lightning_logs" / "tune" / "sgd"
    best = folder / "best.yaml"
    assert last_line(result.stdout) == f"best config: {best}"
    header = "trial | val/acc | epochs | seconds | data.batch_size | model.optimizer.init_args.lr"
    assert header in result.stdout  # the table of the best trials
    study = _study(tmp_path)
    assert _states(study) == [TrialState.COMPLETE] * 3
    for trial in study.trials:
        run = folder / f"trial_{trial.number}"
        assert trial.user_attrs["run_dir"] == str(run) and trial.user_attrs["seconds"] > 0
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert (
            config["model"]["optimizer"]["init_args"]["lr"]
            == trial.params["model.optimizer.init_args.lr"]
        )
        events = EventAccumulator(str(run))
        events.Reload()
        assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("test/")]  # unseen
        assert max(e.value for e in events.Scalars("val/acc")) == pytest.approx(trial.value)
        columns = _hparams_columns(events)  # the searched keys come first, with their values
        assert sorted(list(columns)[:2]) == sorted(SPACE)
        assert columns["model.optimizer.init_args.lr"] == pytest.approx(
            trial.params["model.optimizer.init_args.lr"]
        )
        assert columns["data.batch_size"] == str(trial.params["data.batch_size"])
    assert (folder / "history.png").stat().st_size > 0
    assert (folder / "importances.png").stat().st_size > 0
    assert f"optuna-dashboard {folder / 'study.journal'}" in result.stdout

    # the best config runs as it is, into a run folder of its own
    main(["fit", "--config", str(best)])
    rerun = tmp_path / "lightning_logs" / "version_0"
    assert "test/acc" in capsys.readouterr().out and (rerun / "config.yaml").is_file()

    # the same command continues the study to the new total, keeping what is done
    before = [(t.number, t.params, t.value) for t in study.trials]
    again = _tune(*_args(data_dir, tmp_path, 5))
    assert again.returncode == 0, again.stderr[-3000:]
    study = _study(tmp_path)
    assert _states(study) == [TrialState.COMPLETE] * 5
    assert [(t.number, t.params, t.value) for t in study.trials][:3] == before


def test_a_study_continues_only_as_it_began_and_its_best_config_lives_in_the_study(
    data_dir, tmp_path
):
    args = _args(data_dir, tmp_path, 1)
    assert (first := _tune(*args)).returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "lightning_logs" / "tune" / "sgd"

    def refused(result, phrase):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
        assert phrase in errors[0], errors[0]

    wider = {**SPACE, "data.batch_size": {"type": "categorical", "choices": [32, 64, 128]}}
    other_space = _args(data_dir, tmp_path, 2, space=_space(tmp_path / "lightning_logs", wider))
    refused(_tune(*other_space), "was started with another search file (data.batch_size:")
    refused(
        _tune(*args, "--trainer.max_epochs=1", "--trials=2"),
        "was started with another config (trainer.max_epochs: 2 then, 1 now)",
    )
    assert len(_study(tmp_path).trials) == 1  # neither ran a trial

    # on another machine of the study the trial's folder is not there: the study has its config
    shutil.move(folder / "trial_0", tmp_path / "elsewhere")
    (folder / "best.yaml").unlink()
    assert (again := _tune(*args)).returncode == 0, again.stderr[-3000:]
    best = yaml.safe_load((folder / "best.yaml").read_text())
    lr = _study(tmp_path).trials[0].params["model.optimizer.init_args.lr"]
    assert best["model"]["optimizer"]["init_args"]["lr"] == lr

    # a study started anew under the same name would write into the old trial's folder
    shutil.move(tmp_path / "elsewhere", folder / "trial_0")
    (folder / "study.journal").unlink()
    refused(_tune(*args), "holds trial_0, which the study sgd")
    assert not (folder / "trial_0" / "config-2.yaml").exists()  # the old trial is untouched


def test_a_trial_that_falls_behind_is_pruned(data_dir, tmp_path):
    space = _space(tmp_path)
    journal = tmp_path / "lightning_logs" / "tune" / "sgd" / "study.journal"
    journal.parent.mkdir(parents=True)
    study = optuna.create_study(
        study_name="sgd",
        storage=JournalStorage(JournalFileBackend(str(journal))),
        direction="maximize",
    )
    lr = "model.optimizer.init_args.lr"
    for value in (0.1, 0.1, 0.001):  # the third learns far slower than the first two
        study.enqueue_trial({lr: value, "data.batch_size": 64})
    args = _args(
        data_dir,
        tmp_path,
        3,
        "--pruner=median",
        "--startup_trials=2",
        "--warmup_epochs=1",
        "--trainer.max_epochs=4",
        space=space,
    )
    result = _tune(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(tmp_path)
    assert _states(study) == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    pruned = study.trials[2]
    assert len(pruned.intermediate_values) < 4  # stopped before its last epoch
    assert "3 trials, 2 complete, 1 pruned, 0 failed" in result.stdout


def test_two_workers_share_a_study_and_each_trial_runs_once(data_dir, tmp_path):
    result = _tune(*_args(data_dir, tmp_path, 4, "--workers=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(tmp_path)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert 4 <= len(done) == len(study.trials) <= 5  # a worker may start one as the other ends
    assert len({t.user_attrs["pid"] for t in done}) == 2  # both workers ran trials
    folders = [t.user_attrs["run_dir"] for t in done]
    assert len(set(folders)) == len(folders) and all(
        Path(f, "config.yaml").is_file() for f in folders
    )


def _two_workers_in_their_trials(data_dir, root, trials: int, epochs: int):
    """A search with two workers, once both are in a trial: the command and the workers' pids."""
    args = _args(
        data_dir,
        root,
        trials,
        "--workers=2",
        "--trainer.limit_train_batches=400",
        f"--trainer.max_epochs={epochs}",
    )
    process = subprocess.Popen(_command(*args), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    folder = root / "lightning_logs" / "tune" / "sgd"
    _wait_for(lambda: len(list(folder.glob("trial_*/events.out.tfevents.*"))) == 2, process)
    return process, Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()


def test_when_one_of_two_workers_is_killed_the_search_still_finishes(data_dir, tmp_path):
    process, children = _two_workers_in_their_trials(data_dir, tmp_path, trials=3, epochs=2)
    os.kill(int(children[0]), signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert f"worker {children[0]} was killed by SIGKILL" in stderr
    study = _study(tmp_path)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["pid"] == int(children[0])
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 3 and failed[0].params in [t.params for t in complete]  # retried


def test_workers_stop_when_the_command_is_killed_and_their_trials_are_retried(data_dir, tmp_path):
    process, children = _two_workers_in_their_trials(data_dir, tmp_path, trials=4, epochs=3)
    process.kill()
    process.wait(timeout=30)
    deadline = time.monotonic() + 120
    while any(Path(f"/proc/{pid}").exists() for pid in children):
        assert time.monotonic() < deadline, "the workers went on without the command"
        time.sleep(0.2)
    study = _study(tmp_path)  # both stopped (with a checkpoint if training had begun)
    assert _states(study) == [TrialState.FAIL] * 2 + [TrialState.WAITING] * 2
    queued = [t.system_attrs["fixed_params"] for t in study.trials[2:]]  # Optuna's enqueue
    stopped = [t.params for t in study.trials[:2]]
    assert sorted(queued, key=str) == sorted(stopped, key=str)


def test_kill_9_of_a_worker_fails_its_trial_and_the_next_run_retries_it(data_dir, tmp_path):
    long = ("--trainer.limit_train_batches=400", "--trainer.max_epochs=3")
    args = _args(data_dir, tmp_path, 2, *long)
    process = subprocess.Popen(_command(*args), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    trial_0 = tmp_path / "lightning_logs" / "tune" / "sgd" / "trial_0"
    _wait_for(lambda: any(trial_0.glob("events.out.tfevents.*")), process)
    process.kill()
    assert process.wait(timeout=30) == -signal.SIGKILL
    study = _study(tmp_path)  # still readable
    assert _states(study) == [TrialState.RUNNING]  # Optuna alone would leave it so forever

    result = _tune(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial 0: its process died; its parameters will be tried again" in result.stderr
    study = _study(tmp_path)
    assert _states(study) == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    retry = study.trials[1]
    assert retry.params == study.trials[0].params and retry.user_attrs["retry_of"] == 0


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_trial_with_its_checkpoint_and_the_search_goes_on(
    signum, code, data_dir, tmp_path
):
    args = _args(
        data_dir, tmp_path, 2, "--trainer.limit_train_batches=400", "--trainer.max_epochs=3"
    )
    process = subprocess.Popen(_command(*args), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    trial_0 = tmp_path / "lightning_logs" / "tune" / "sgd" / "trial_0"
    _wait_for(lambda: any(trial_0.glob("events.out.tfevents.*")), process)
    time.sleep(1)  # into the training steps
    process.send_signal(signum)
    assert process.wait(timeout=120) == code
    stderr = process.stderr.read()
    assert "Traceback" not in stderr and "--ckpt_path" not in stderr
    assert "the same command continues the study" in last_line(stderr)
    assert (trial_0 / "checkpoints" / "last.ckpt").is_file()
    study = _study(tmp_path)
    assert study.trials[0].state == TrialState.FAIL  # not counted as a result
    assert [t.state for t in study.trials[1:]] == [TrialState.WAITING]  # its retry

    result = _tune(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(tmp_path)
    assert _states(study) == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[1].params == study.trials[0].params


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is missing: apt-get install -y postgresql (make test installs it)")
    return Path(found[-1]).parent


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server in a temporary folder, run by the unprivileged postgres user
    (the server refuses root), on a free port of 127.0.0.1."""
    bin_dir = _postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="fashion-lightning-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"

    def postgres(*command: str) -> None:
        subprocess.run([*as_postgres, *command], check=True, capture_output=True, timeout=120)

    postgres(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    options = f"-p {port} -k {folder} -h 127.0.0.1"
    postgres(
        str(bin_dir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        options,
        "-l",
        str(folder / "log"),
        "-w",
        "start",
    )
    try:
        postgres(
            str(bin_dir / "createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "postgres",
            "optuna",
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_machines_share_a_study_in_postgresql(postgres_url, data_dir, tmp_path):
    # two searches started apart, as on two machines: their own folders, one study
    searches = []
    for machine in ("a", "b"):
        root = tmp_path / machine
        root.mkdir()
        args = _args(data_dir, root, 4, f"--storage={postgres_url}", "--study=shared")
        searches.append(
            subprocess.Popen(
                _command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    for search in searches:
        _, err = search.communicate(timeout=600)
        assert search.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert 4 <= len(done) == len(study.trials) <= 5  # all accounted for
    assert len({t.number for t in done}) == len(done)
    folders = [Path(t.user_attrs["run_dir"]) for t in done]
    assert len(set(folders)) == len(folders)  # none ran twice
    assert {folder.parents[3].name for folder in folders} == {"a", "b"}  # both machines worked
    for trial, folder in zip(done, folders, strict=True):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["data"]["batch_size"] == trial.params["data.batch_size"]


@pytest.mark.parametrize(
    ("space", "extra", "phrase"),
    [
        (
            {"model.no_such": {"type": "float", "low": 0, "high": 1}},
            [],
            "model.no_such is not a key",
        ),
        ("", [], "expected a mapping of config keys to distributions"),
        ("model.dropout: [unclosed\n", [], "not valid YAML"),
        ({"model.dropout": {"type": "uniform", "low": 0, "high": 1}}, [], "'type' must be one of"),
        ({"model.dropout": {"type": "float", "low": 1, "high": 0}}, [], "model.dropout:"),
        (SPACE, ["--storage=nosuchdb://x/y"], "--storage nosuchdb://x/y: cannot open"),
        (SPACE, ["--storage=postgresql://postgres@127.0.0.1:1/optuna"], "cannot open"),
        (SPACE, ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (
            {"model.dropout": {"type": "float", "low": 0.0, "high": 1.5}},
            [],
            "model.dropout: 1.5 is refused",
        ),
        (
            {"model.optimizer": {"type": "categorical", "choices": [{"class_path": "x.Y"}]}},
            [],
            "choices must be numbers, strings, booleans or null",
        ),
        (
            {"model.optimizer": {"type": "float", "low": 0, "high": 1}},
            [],
            "model.optimizer is a group of settings",
        ),
        (SPACE, ["--trainer.fast_dev_run=true"], "a debug run records no val/acc"),
        (SPACE, ["--study=../escape"], "use letters, digits"),
        (SPACE, ["--warmup_epochs=-1"], "must be at least 0, got -1"),
        (SPACE, ["--storage=/proc/no/study.journal"], "cannot write the study's journal file"),
        (SPACE, ["--storage=sqlite:////proc/no/study.db"], "cannot create /proc/no"),
    ],
    ids=[
        "unknown-key",
        "empty",
        "malformed",
        "bad-type",
        "bad-range",
        "bad-url",
        "no-db",
        "bad-flag",
        "partly-out-of-range",
        "dict-choice",
        "group-key",
        "fast-dev-run",
        "study-path",
        "negative",
        "unwritable-storage",
        "unwritable-sqlite",
    ],
)
def test_bad_input_is_one_line_before_any_trial(space, extra, phrase, data_dir, tmp_path):
    result = _tune(*_args(data_dir, tmp_path, 2, *extra, space=_space(tmp_path, space)))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and phrase in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("lightning_logs/tune/*/trial_*"))


def test_a_file_that_is_not_a_journal_is_refused_and_left_as_it_was(data_dir, tmp_path):
    notes = tmp_path / "notes.yaml"
    notes.write_text("model:\n  dropout: 0.1\n")
    result = _tune(*_args(data_dir, tmp_path, 2, f"--storage={notes}"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "not a readable Optuna journal" in last_line(result.stderr)
    assert notes.read_text() == "model:\n  dropout: 0.1\n"


def test_the_shipped_search_space_fits_the_recipe_it_searches_over():
    from fashion_lightning.tune.space import check_space, load_search_space

    search, recipe = ROOT / "configs" / "search" / "mlp.yaml", ROOT / "configs" / "best.yaml"
    check_space(load_search_space(search), recipe, [], search)  # every end of every range


def test_numbers_yaml_reads_as_text_are_taken_as_numbers(tmp_path):
    from fashion_lightning.tune.space import load_search_space

    search = tmp_path / "space.yaml"
    search.write_text("model.dropout: {type: float, low: 1e-4, high: 1e-2, log: true}\n")
    distribution = load_search_space(search)["model.dropout"]
    assert (distribution.low, distribution.high) == (1e-4, 1e-2)
