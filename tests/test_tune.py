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
from optuna.study import StudyDirection
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
# trials that train when the test stops them: last.ckpt at step 10 of 120 says they do
IN_TRAINING = ("--trainer.limit_train_batches=60", "--checkpoint.every_n_train_steps=10")
# trials that validate when the test stops them: last.ckpt at the last training step of an
# epoch (5) comes right before a validation of 300 single images (a second or two)
IN_VALIDATION = (
    "--trainer.limit_train_batches=5",
    "--checkpoint.every_n_train_steps=5",
    "--data.eval_batch_size=1",
    "--trainer.limit_val_batches=300",
)
LR = "model.optimizer.init_args.lr"


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


def _start(log: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """The search as a terminal starts it: the leader of a process group of its own (the
    group a terminal signals), its stderr in ``log`` (a pipe nobody reads fills and stops it)."""
    with log.open("w") as stderr:
        return subprocess.Popen(
            [*prefix, *_command(*args)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )


def _wait_for(predicate, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _checkpointed(folder: Path, trials: int):
    """Whether ``trials`` trials in ``folder`` have written their last.ckpt."""
    return lambda: len(list(folder.glob("trial_*/checkpoints/last.ckpt"))) >= trials


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


def _events(trial: optuna.trial.FrozenTrial, tag: str) -> list[float]:
    events = EventAccumulator(trial.user_attrs["run_dir"])
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def _states(study: optuna.Study) -> list[TrialState]:
    return [trial.state for trial in study.get_trials()]


def _key(params: dict) -> str:
    return repr(sorted(params.items()))


def _failed_are_queued(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Every trial the search started is complete, or failed with its parameters queued again
    (Optuna's waiting trials), or already tried again to completion by a worker that had not
    stopped yet. Returns the failed ones."""
    trials = study.get_trials()
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING}
    failed = [t for t in trials if t.state == TrialState.FAIL]
    queued = [t.system_attrs["fixed_params"] for t in trials if t.state == TrialState.WAITING]
    retried = [
        t.params for t in trials if t.state == TrialState.COMPLETE and "retry_of" in t.user_attrs
    ]
    assert sorted(map(_key, [*queued, *retried])) == sorted(_key(t.params) for t in failed)
    return failed


def _rerun_completes(args: list[str], root: Path, trials: int, failed: list) -> None:
    """The same command again: the study reaches its total, the failed trials' parameters
    among the complete ones."""
    result = _tune(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(root)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= trials
    assert {_key(t.params) for t in failed} <= {_key(t.params) for t in complete}


def test_a_search_runs_trials_in_their_folders_and_writes_a_runnable_best_config(
    data_dir, tmp_path, capsys
):
    # the objective is the best val/acc whatever the checkpoint monitors; the trials test
    # on 2 batches, which --confirm_seeds must not inherit
    own = (
        "--checkpoint.monitor=val/loss",
        "--checkpoint.mode=min",
        "--trainer.limit_test_batches=2",
    )
    result = _tune(*_args(data_dir, tmp_path, 3, *own))
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "lightning_logs" / "tune" / "sgd"
    best = folder / "best.yaml"
    assert last_line(result.stdout) == f"best config: {best}"
    header = "trial | val/acc | epochs | seconds | data.batch_size | model.optimizer.init_args.lr"
    assert header in result.stdout  # the table of the best trials
    study = _study(tmp_path)
    assert study.direction == StudyDirection.MAXIMIZE
    assert _states(study) == [TrialState.COMPLETE] * 3
    for trial in study.trials:
        run = folder / f"trial_{trial.number}"
        assert trial.user_attrs["run_dir"] == str(run) and trial.user_attrs["seconds"] > 0
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["optimizer"]["init_args"]["lr"] == trial.params[LR]
        events = EventAccumulator(str(run))
        events.Reload()
        assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("test/")]  # unseen
        assert max(e.value for e in events.Scalars("val/acc")) == pytest.approx(trial.value)
        columns = _hparams_columns(events)  # the searched keys come first, with their values
        assert sorted(list(columns)[:2]) == sorted(SPACE)
        assert columns[LR] == pytest.approx(trial.params[LR])
        assert columns["data.batch_size"] == str(trial.params["data.batch_size"])
    best_trial = max(study.trials, key=lambda t: t.value)
    best_config = yaml.safe_load(best.read_text())
    assert best_config["model"]["optimizer"]["init_args"]["lr"] == best_trial.params[LR]
    assert f"trial {best_trial.number}, val/acc {best_trial.value:.4f}" in best.read_text()
    assert (folder / "history.png").stat().st_size > 0
    assert (folder / "importances.png").stat().st_size > 0
    assert f"optuna-dashboard {folder / 'study.journal'}" in result.stdout

    # the best config runs as it is, into a run folder of its own
    main(["fit", "--config", str(best)])
    rerun = tmp_path / "lightning_logs" / "best_0"  # named after best.yaml
    assert "test/acc" in capsys.readouterr().out and (rerun / "config.yaml").is_file()

    # the same command continues the study to the new total, keeping what is done, and
    # measures the best config's test accuracy on the whole test split
    before = [(t.number, t.params, t.value) for t in study.trials]
    again = _tune(*_args(data_dir, tmp_path, 4, *own, "--confirm_seeds=1"))
    assert again.returncode == 0, again.stderr[-3000:]
    study = _study(tmp_path)
    assert _states(study) == [TrialState.COMPLETE] * 4
    assert [(t.number, t.params, t.value) for t in study.trials][:3] == before
    assert "confirm seed 42: test/acc " in again.stdout
    assert "% on 10000 test images" in again.stdout
    assert "each on the whole test split" in again.stdout
    confirmed = yaml.safe_load((folder / "confirm_seed_42" / "config.yaml").read_text())
    assert confirmed["trainer"]["limit_test_batches"] == 1.0


def test_a_study_of_val_loss_minimises_it(data_dir, tmp_path):
    result = _tune(*_args(data_dir, tmp_path, 2, "--objective=val/loss"))
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(tmp_path)
    assert study.direction == StudyDirection.MINIMIZE
    assert study.metric_names == ["val/loss"]
    for trial in study.trials:
        assert trial.value == pytest.approx(min(_events(trial, "val/loss")))
    assert "trial | val/loss | epochs" in result.stdout
    best = min(study.trials, key=lambda t: t.value)
    written = yaml.safe_load((tmp_path / "lightning_logs/tune/sgd/best.yaml").read_text())
    assert written["model"]["optimizer"]["init_args"]["lr"] == best.params[LR]


def test_a_study_continues_only_as_it_began_and_its_best_config_lives_in_the_study(
    data_dir, tmp_path, tune_here
):
    args = _args(data_dir, tmp_path, 1)
    assert (first := _tune(*args)).returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "lightning_logs" / "tune" / "sgd"
    journal = (folder / "study.journal").read_bytes()

    def refused(args, phrase):
        code, stderr = tune_here(*args)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, stderr[-2000:]
        assert phrase in errors[0], errors[0]

    wider = {**SPACE, "data.batch_size": {"type": "categorical", "choices": [32, 64, 128]}}
    refused(  # the difference as the search file writes it
        _args(data_dir, tmp_path, 2, space=_space(tmp_path / "lightning_logs", wider)),
        "was started with another search file (data.batch_size: [32, 64] then, [32, 64, 128] now)",
    )
    refused(
        [*args, "--trainer.max_epochs=1", "--trials=2"],
        "was started with another config (trainer.max_epochs: 2 then, 1 now)",
    )
    assert (folder / "study.journal").read_bytes() == journal  # neither wrote to the study

    # on another machine of the study the trial's folder is not there: the study has its config
    shutil.move(folder / "trial_0", tmp_path / "elsewhere")
    (folder / "best.yaml").unlink()
    assert (again := tune_here(*args))[0] == 0, again[1][-3000:]
    best = yaml.safe_load((folder / "best.yaml").read_text())
    lr = _study(tmp_path).trials[0].params[LR]
    assert best["model"]["optimizer"]["init_args"]["lr"] == lr

    # a study started anew under the same name would write into the old trial's folder
    shutil.move(tmp_path / "elsewhere", folder / "trial_0")
    (folder / "study.journal").unlink()
    refused(args, "holds trial_0, which the study sgd")
    assert not (folder / "trial_0" / "config-2.yaml").exists()  # the old trial is untouched
    assert (folder / "study.journal").read_bytes() == b""  # and no study was begun


def test_a_search_file_difference_reads_as_the_file_writes_it():
    from fashion_lightning.errors import SearchError
    from fashion_lightning.tune.space import load_search_space
    from fashion_lightning.tune.study import check_same_study

    def started(text: str, folder: Path) -> dict:
        path = folder / "space.yaml"
        path.write_text(text)
        space = load_search_space(path)
        json = optuna.distributions.distribution_to_json
        return {
            "search": {k: json(d) for k, d in space.items()},
            "config": {},
            "objective": "val/acc",
        }

    with tempfile.TemporaryDirectory() as folder:
        then = started("model.dropout: {type: float, low: 0.0, high: 0.5}\n", Path(folder))
        now = started(
            "model.dropout: {type: float, low: 1.0e-3, high: 0.4, log: true}\n", Path(folder)
        )
    study = optuna.create_study(study_name="sgd", direction="maximize")
    study.set_user_attr("started_with", then)
    with pytest.raises(SearchError, match=r"\(model.dropout: 0.0..0.5 then, 0.001..0.4 log now\)"):
        check_same_study(study, "in memory", now)


def test_a_trial_that_falls_behind_is_pruned(data_dir, tmp_path):
    space = _space(tmp_path)
    journal = tmp_path / "lightning_logs" / "tune" / "sgd" / "study.journal"
    journal.parent.mkdir(parents=True)
    study = optuna.create_study(
        study_name="sgd",
        storage=JournalStorage(JournalFileBackend(str(journal))),
        direction="maximize",
    )
    for value in (0.1, 0.1, 0.001):  # the third learns far slower than the first two
        study.enqueue_trial({LR: value, "data.batch_size": 64})
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


def _two_workers_in_their_trials(args: list[str], root: Path, log: Path):
    """A search with two workers, once both train a trial: the command and the workers' pids."""
    process = _start(log, *args)
    _wait_for(_checkpointed(root / "lightning_logs" / "tune" / "sgd", 2), process, log)
    return process, Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()


@pytest.mark.parametrize(
    ("signum", "scenario"),
    [(signal.SIGINT, IN_TRAINING), (signal.SIGTERM, IN_VALIDATION)],
    ids=["ctrl-c-while-training", "sigterm-while-validating"],
)
def test_a_signal_to_the_terminal_s_process_group_stops_two_workers_cleanly(
    signum, scenario, data_dir, tmp_path
):
    args = _args(data_dir, tmp_path, 2, "--workers=2", *scenario)
    log = tmp_path / "stderr.txt"
    process, workers = _two_workers_in_their_trials(args, tmp_path, log)
    # a terminal signals its foreground process group: the command alone, which passes the
    # signal on once (a worker that got it twice would stop at once, without its checkpoint)
    assert [os.getpgid(int(pid)) != process.pid for pid in workers] == [True, True]
    os.killpg(process.pid, signum)
    assert process.wait(timeout=120) == 128 + signum
    stderr = log.read_text()
    assert "refused" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name} at once" not in stderr  # each worker got the signal once
    assert "the same command continues the study" in last_line(stderr)
    failed = _failed_are_queued(_study(tmp_path))
    assert failed  # (a worker whose trial had ended stops between trials)
    stops = [line for line in stderr.splitlines() if f"stopped by {name}" in line]
    saved = [line for line in stops if "; saved " in line and "checkpoints/last.ckpt" in line]
    assert len(saved) == len(failed), stops  # each stopped trial with its checkpoint
    if scenario is IN_VALIDATION:  # after the validation, with the epoch's checkpoint
        assert any(" after epoch " in line for line in saved), saved
    _rerun_completes(args, tmp_path, 2, failed)


def test_when_one_of_two_workers_is_killed_the_search_still_finishes(data_dir, tmp_path):
    log = tmp_path / "stderr.txt"
    args = _args(data_dir, tmp_path, 3, "--workers=2", *IN_TRAINING)
    process, children = _two_workers_in_their_trials(args, tmp_path, log)
    os.kill(int(children[0]), signal.SIGKILL)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert f"worker {children[0]} was killed by SIGKILL" in log.read_text()
    study = _study(tmp_path)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["pid"] == int(children[0])
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 3 and failed[0].params in [t.params for t in complete]  # retried


def test_workers_stop_when_the_command_is_killed_and_their_trials_are_retried(data_dir, tmp_path):
    log = tmp_path / "stderr.txt"
    args = _args(data_dir, tmp_path, 2, "--workers=2", *IN_TRAINING)
    process, children = _two_workers_in_their_trials(args, tmp_path, log)
    process.kill()
    process.wait(timeout=30)
    deadline = time.monotonic() + 120
    while any(Path(f"/proc/{pid}").exists() for pid in children):
        assert time.monotonic() < deadline, "the workers went on without the command"
        time.sleep(0.2)
    failed = _failed_are_queued(_study(tmp_path))  # stopped, with a checkpoint
    assert failed and "refused" not in log.read_text()
    _rerun_completes(args, tmp_path, 2, failed)


def test_kill_9_of_a_worker_fails_its_trial_and_the_next_run_retries_it(data_dir, tmp_path):
    args = _args(data_dir, tmp_path, 1, *IN_TRAINING)
    log = tmp_path / "stderr.txt"
    process = _start(log, *args)
    _wait_for(_checkpointed(tmp_path / "lightning_logs" / "tune" / "sgd", 1), process, log)
    process.kill()
    assert process.wait(timeout=30) == -signal.SIGKILL
    study = _study(tmp_path)  # still readable
    assert _states(study) == [TrialState.RUNNING]  # Optuna alone would leave it so forever

    result = _tune(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial 0: its process died; its parameters will be tried again" in result.stderr
    study = _study(tmp_path)
    assert _states(study) == [TrialState.FAIL, TrialState.COMPLETE]
    retry = study.trials[1]
    assert retry.params == study.trials[0].params and retry.user_attrs["retry_of"] == 0


def test_a_trial_whose_process_died_before_it_began_is_failed_after_the_grace(data_dir, tmp_path):
    # Optuna creates a trial before it calls the objective: a process killed in between
    # leaves a running trial that names no process and sends no heartbeat
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="sgd", storage=url, direction="maximize").ask()
    args = _args(data_dir, tmp_path, 1, f"--storage={url}", "--heartbeat=1", "--grace=2")
    result = _tune(*args, timeout=180)  # (it would wait for that trial forever)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial 0: its process died before it began" in result.stderr
    study = optuna.load_study(study_name="sgd", storage=url)
    assert _states(study) == [TrialState.FAIL, TrialState.COMPLETE]


def test_a_ctrl_c_stops_the_trial_with_its_checkpoint_and_the_search_goes_on(data_dir, tmp_path):
    args = _args(data_dir, tmp_path, 1, *IN_TRAINING)
    log = tmp_path / "stderr.txt"
    process = _start(log, *args)
    trial_0 = tmp_path / "lightning_logs" / "tune" / "sgd" / "trial_0"
    _wait_for(_checkpointed(trial_0.parent, 1), process, log)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == 130
    stderr = log.read_text()
    assert "Traceback" not in stderr and "--ckpt_path" not in stderr
    assert "the same command continues the study" in last_line(stderr)
    assert f"; saved {trial_0 / 'checkpoints' / 'last.ckpt'}" in last_line(stderr)
    study = _study(tmp_path)
    assert study.trials[0].state == TrialState.FAIL  # not counted as a result
    assert [t.state for t in study.trials[1:]] == [TrialState.WAITING]  # its retry

    result = _tune(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(tmp_path)
    assert _states(study) == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].params == study.trials[0].params


def test_a_journal_with_a_torn_last_line_is_mended_and_the_study_goes_on(data_dir, tmp_path):
    args = _args(data_dir, tmp_path, 2)
    assert (first := _tune(*args)).returncode == 0, first.stderr[-3000:]
    before = _study(tmp_path).trials
    journal = tmp_path / "lightning_logs" / "tune" / "sgd" / "study.journal"
    content = journal.read_bytes()
    last = content.rstrip(b"\n").rfind(b"\n") + 1
    cut = last + (len(content) - last) // 2  # a power loss halfway through the last write
    journal.write_bytes(content[:cut])

    result = _tune(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "torn line" in line]
    assert len(notes) == 1, result.stderr[-3000:]
    (side,) = journal.parent.glob("study.journal.torn-*")
    assert side.read_bytes() == content[last:cut] and str(side) in notes[0]
    study = _study(tmp_path)  # readable, and again after this run's writes
    assert study.trials[0].params == before[0].params and study.trials[0].value == before[0].value
    assert study.trials[1].params == before[1].params  # its completion was the torn line
    assert _states(study) == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[2].params == before[1].params  # tried again


def test_a_missing_data_set_is_one_line_before_the_study_even_with_workers(tmp_path, tune_here):
    empty = tmp_path / "nothing"
    empty.mkdir()
    args = _args(
        empty, tmp_path, 2, "--workers=2", f"--data.source_dir={empty}", "--data.download=false"
    )
    code, stderr = tune_here(*args)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, stderr[-3000:]
    assert "FashionMNIST not found" in errors[0]
    assert not (tmp_path / "lightning_logs").exists()  # no study, no trial folder


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


def test_a_dead_machine_s_trial_is_retried_by_the_other_machine_in_postgresql(
    postgres_url, data_dir, tmp_path
):
    """Two machines share a study; one dies (``kill -9``) while its trial runs; the other
    sees its heartbeats stop, fails the trial and runs its parameters again."""
    if os.geteuid() != 0:
        pytest.skip("needs root: machine a runs in a UTS namespace of its own (its host name)")
    # machine a has a host name of its own, so that only the heartbeats can tell it died
    machine_a = ("unshare", "--uts", "sh", "-c", 'hostname machine-a && exec "$@"', "sh")
    searches = {}
    for machine in ("a", "b"):
        root = tmp_path / machine
        root.mkdir()
        args = _args(
            data_dir,
            root,
            2,
            f"--storage={postgres_url}",
            "--study=shared",
            "--heartbeat=1",
            "--grace=3",
            *IN_TRAINING,
        )
        prefix = machine_a if machine == "a" else ()
        searches[machine] = _start(root / "stderr.txt", *args, prefix=prefix)
    a_trials = tmp_path / "a" / "lightning_logs" / "tune" / "shared"
    _wait_for(lambda: any(a_trials.glob("trial_*")), searches["a"], tmp_path / "a/stderr.txt")
    searches["a"].kill()  # the machine dies with its trial

    b = searches["b"]
    assert b.wait(timeout=300) == 0, (tmp_path / "b/stderr.txt").read_text()[-3000:]
    assert "no heartbeat for over 3 s" in (tmp_path / "b/stderr.txt").read_text()
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    (dead,) = [t for t in study.trials if t.state == TrialState.FAIL]
    assert dead.user_attrs["host"] == "machine-a"
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2
    (retry,) = [t for t in complete if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.params == dead.params
    folders = [Path(t.user_attrs["run_dir"]) for t in complete]
    assert {folder.parents[3].name for folder in folders} == {"b"}  # the survivor ran them
    for trial, folder in zip(complete, folders, strict=True):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["data"]["batch_size"] == trial.params["data.batch_size"]


PASSWORD = "Zq@:/Xw?"  # a password with each character a URL reserves


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user:{p}@db-host:5432/optuna",  # unencoded: not a URL SQLAlchemy reads
        "postgresql://user:Zq%40%3A%2FXw%3F@db-host/optuna",  # encoded
        "postgresql://user:{p}",  # no host
        "postgresql://user:{p}@db-host:notaport/optuna",
        "postgresql://db-host/optuna?user=user&password={p}&sslmode=require",
        "postgresql://db-host/optuna?sslpassword={p}",
        "no-such-scheme://user:{p}@@@",
    ],
)
def test_no_byte_of_a_password_is_ever_shown(url):
    from fashion_lightning.errors import SearchError
    from fashion_lightning.tune.storage import check_url, scrubbed, shown

    spec = url.format(p=PASSWORD)
    shows = [shown(spec)]
    try:
        check_url(spec)  # what passes reaches the storage, whose messages are scrubbed
    except SearchError as refused:
        shows.append(str(refused))
    else:
        shows.append(scrubbed(f"cannot connect to {spec}: {PASSWORD}", spec))
    for text in shows:
        assert "Zq" not in text and "Xw" not in text, text


def test_a_password_with_an_at_sign_is_refused_before_anything_prints_it(
    data_dir, tmp_path, tune_here
):
    url = "postgresql://postgres:Zq@Xw@127.0.0.1:1/optuna"
    code, stderr = tune_here(*_args(data_dir, tmp_path, 2, f"--storage={url}"))
    assert code == 2 and "percent-encoded" in last_line(stderr), stderr[-2000:]
    assert "Zq" not in stderr and "Xw" not in stderr


@pytest.fixture
def tune_here(monkeypatch, capsys):
    """The command in this process, for what it refuses before any trial: no start-up cost.
    Returns its exit code and stderr; the signal handlers it takes are given back."""
    from fashion_lightning.tune.command import main as tune_main

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["python -m fashion_lightning.tune"])
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            tune_main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        return code, capsys.readouterr().err

    return run


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
        (
            "model.dropout: {type: float, low: 0, high: 0.5}\n"
            "model.dropout: {type: float, low: 0.1, high: 0.2}\n",
            [],
            "duplicate key 'model.dropout'",
        ),
        ("model.dropout: {type: float, low: 0, low: 0.5, high: 1}\n", [], "duplicate key 'low'"),
        (
            {"data.batch_size": {"type": "int", "low": 16, "high": 64.5}},
            [],
            "data.batch_size: an int range's high must be a whole number, got 64.5",
        ),
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
        (
            SPACE,
            ["--trainer.default_root_dir=/proc/no"],
            "cannot write the search's runs to /proc/no (No such file or directory); pass a "
            "writable --trainer.default_root_dir",
        ),
        (SPACE, ["--heartbeat=5"], "--heartbeat: only an RDB storage"),
        (
            SPACE,
            ["--storage=sqlite:///x.db", "--heartbeat=5", "--grace=5"],
            "--grace 5: must be longer than --heartbeat 5",
        ),
    ],
    ids=[
        "unknown-key",
        "empty",
        "malformed",
        "bad-type",
        "bad-range",
        "duplicate-key",
        "duplicate-argument",
        "int-range-of-fractions",
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
        "unwritable-root",
        "heartbeat-of-a-journal",
        "grace-within-a-heartbeat",
    ],
)
def test_bad_input_is_one_line_before_any_trial(
    space, extra, phrase, data_dir, tmp_path, tune_here
):
    code, stderr = tune_here(*_args(data_dir, tmp_path, 2, *extra, space=_space(tmp_path, space)))
    assert code != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and phrase in errors[0], stderr[-2000:]
    if "--trainer.default_root_dir" in phrase:  # no --storage was passed: none is named
        assert "--storage" not in errors[0]
    assert not list(tmp_path.glob("lightning_logs/tune/*/trial_*"))


def test_a_file_that_is_not_a_journal_is_refused_and_left_as_it_was(data_dir, tmp_path, tune_here):
    notes = tmp_path / "notes.yaml"
    notes.write_text("model:\n  dropout: 0.1\n")
    code, stderr = tune_here(*_args(data_dir, tmp_path, 2, f"--storage={notes}"))
    assert code == 1 and "not a readable Optuna journal" in last_line(stderr), stderr[-2000:]
    assert notes.read_text() == "model:\n  dropout: 0.1\n"
    assert not list(tmp_path.glob("notes.yaml.torn-*"))


@pytest.mark.parametrize(("space", "config"), [("mlp", "best"), ("fast", "fast")])
def test_the_shipped_search_spaces_fit_the_recipes_they_search_over(space, config):
    from fashion_lightning.tune.space import check_space, load_search_space

    search = ROOT / "configs" / "search" / f"{space}.yaml"
    recipe = ROOT / "configs" / f"{config}.yaml"
    check_space(load_search_space(search), recipe, [], search)  # every end of every range


def test_numbers_yaml_reads_as_text_are_taken_as_numbers(tmp_path):
    from fashion_lightning.tune.space import load_search_space

    search = tmp_path / "space.yaml"
    search.write_text("model.dropout: {type: float, low: 1e-4, high: 1e-2, log: true}\n")
    distribution = load_search_space(search)["model.dropout"]
    assert (distribution.low, distribution.high) == (1e-4, 1e-2)


def _crafted_study(root: Path, **user_attrs) -> None:
    """A study of the name the command opens (the config's), as someone may hand it over:
    one finished trial with these records, written through Optuna's own API."""
    journal = root / "lightning_logs" / "tune" / "sgd" / "study.journal"
    journal.parent.mkdir(parents=True)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(study_name="sgd", storage=storage, direction="maximize")
    trial = study.ask({LR: optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    for key, value in user_attrs.items():
        trial.set_user_attr(key, value)
    study.tell(trial, 0.5)


@pytest.mark.parametrize(
    ("records", "phrase"),
    [
        ({"config": "- a\n- list\n"}, "trial 0's config is not a YAML mapping of settings"),
        ({"config": "model: [unclosed\n"}, "trial 0's config is not a YAML mapping"),
        ({"config": "!!python/object/apply:os.system [touch x]\n"}, "is not a YAML mapping"),
        ({"seconds": "x"}, "trial 0's seconds is 'x', not what the search writes"),
        ({"retries": [1]}, "trial 0's retries is [1], not what the search writes"),
        ({"pid": "1"}, "trial 0's pid is '1'"),
        ({"run_dir": 5}, "trial 0's run_dir is 5"),
        ({"run_dir": "/nonexistent/trial_0"}, "the best trial, 0, kept its config in"),
    ],
    ids=["list", "invalid", "tagged", "seconds", "retries", "pid", "run-dir-type", "run-dir-gone"],
)
def test_a_crafted_study_is_one_line(records, phrase, data_dir, tmp_path, tune_here):
    _crafted_study(tmp_path, **records)
    code, stderr = tune_here(*_args(data_dir, tmp_path, 1))
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and phrase in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr and not (tmp_path / "x").exists()
    assert not list(tmp_path.glob("lightning_logs/tune/sgd/trial_*"))


def test_a_crafted_started_with_is_one_line(data_dir, tmp_path, tune_here):
    _crafted_study(tmp_path)
    journal = tmp_path / "lightning_logs" / "tune" / "sgd" / "study.journal"
    study = optuna.load_study(
        study_name="sgd", storage=JournalStorage(JournalFileBackend(str(journal)))
    )
    study.set_user_attr("started_with", ["not", "a", "mapping"])
    code, stderr = tune_here(*_args(data_dir, tmp_path, 1))
    assert code == 2 and "its started_with is not what the search writes" in last_line(stderr)


def test_a_queued_trial_outside_the_search_space_is_one_line(data_dir, tmp_path, tune_here):
    _crafted_study(tmp_path)
    journal = tmp_path / "lightning_logs" / "tune" / "sgd" / "study.journal"
    study = optuna.load_study(
        study_name="sgd", storage=JournalStorage(JournalFileBackend(str(journal)))
    )
    study.enqueue_trial({"data.batch_size": "os.system"})
    code, stderr = tune_here(*_args(data_dir, tmp_path, 2))
    assert (
        code == 2
        and "trial 1 is queued with data.batch_size 'os.system', which the search file does not hold"
        in last_line(stderr)
    ), stderr[-2000:]


def test_a_trial_of_another_machine_in_a_quiet_journal_is_run_again(data_dir, tmp_path, tune_here):
    """A journal keeps no heartbeats: a study someone hands over may hold a trial that was
    running on their machine when they copied it. Once no process has written to the journal
    for a quarter of an hour, its parameters run here."""
    journal = tmp_path / "lightning_logs" / "tune" / "sgd" / "study.journal"
    journal.parent.mkdir(parents=True)
    study = optuna.create_study(
        study_name="sgd",
        storage=JournalStorage(JournalFileBackend(str(journal))),
        direction="maximize",
    )
    trial = study.ask({LR: optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    for key, value in (
        ("host", "their-laptop"),
        ("pid", 4242),
        ("run_dir", str(journal.parent / "trial_0")),
    ):
        trial.set_user_attr(key, value)
    quiet = time.time() - 3600
    os.utime(journal, (quiet, quiet))
    code, stderr = tune_here(*_args(data_dir, tmp_path, 1))
    assert code == 0, stderr[-2000:]
    assert "trial 0: its machine has not written to the study for 900 s" in stderr
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]
