"""Files a user is handed are data: a crafted checkpoint, config or search file never imports or
runs code, and is refused in one line before anything is built or written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from fashion_lightning.checkpoints import CROSS_ENTROPY_KEY
from fashion_lightning.configs import TRUSTED_IMPORTS_ENV
from tests.helpers import ROOT, SGD_CONFIG, TINY, cli_in_process, fit_args, last_line

pytestmark = pytest.mark.slow  # a fit for the checkpoints, and a search in a process


@pytest.fixture(scope="module")
def good_checkpoint(data_dir, tmp_path_factory):
    from fashion_lightning.cli import main

    root = tmp_path_factory.mktemp("good")
    main(fit_args(data_dir, root, *TINY))
    return root / "lightning_logs" / "sgd_0" / "checkpoints" / "last.ckpt"


def _crafted(good_checkpoint, path, **hyper_parameters):
    """A real checkpoint of this project whose hyper_parameters were altered as an attacker would."""
    checkpoint = torch.load(good_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"].update(hyper_parameters)
    torch.save(checkpoint, path)
    return path


def _command(args, capsys, monkeypatch, folder=None, trusted=None) -> tuple[int, str]:
    """Run the CLI in this process as from ``folder`` (where a module of the test may lie,
    importable), with ``trusted`` as FASHION_LIGHTNING_TRUSTED_IMPORTS; its exit code and
    last line."""
    if folder is not None:
        monkeypatch.chdir(folder)
        monkeypatch.syspath_prepend(str(folder))
    if trusted is not None:
        monkeypatch.setenv(TRUSTED_IMPORTS_ENV, trusted)
    code, err = cli_in_process(args, capsys)
    return code, last_line(err) if err.strip() else ""


def _shell(marker) -> dict:
    return {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}


def _evil_module(folder, marker):
    """A module whose import alone would leave a marker file: importing it runs its code."""
    (folder / "evil_module.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from lightning.pytorch.callbacks import Callback\n"
        "class Quiet(Callback):\n    pass\n"
    )


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict", "fit"])
@pytest.mark.parametrize("key", ["optimizer", "lr_scheduler"])
def test_a_checkpoint_that_names_a_shell_command_is_refused_before_anything_runs(
    subcommand, key, good_checkpoint, data_dir, tmp_path, capsys, monkeypatch
):
    marker = tmp_path / "ran"
    crafted = _crafted(good_checkpoint, tmp_path / "crafted.ckpt", **{key: _shell(marker)})
    args = [subcommand, *fit_args(data_dir, tmp_path / "runs", *TINY)[1:], f"--ckpt_path={crafted}"]
    code, line = _command(args, capsys, monkeypatch)
    assert code == 1
    assert line.startswith(
        f"error: --ckpt_path {crafted}: hyper_parameters.{key}: 'os.system' is not "
    )
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()  # nothing was written


@pytest.mark.parametrize(
    ("hyper_parameters", "phrase"),
    [
        ({"_instantiator": "os.system"}, "hyper_parameters._instantiator names 'os.system'"),
        ({"_class_path": "os.system"}, "hyper_parameters._class_path names 'os.system'"),
        ({"optimizer": "evil_module.Quiet"}, "hyper_parameters.optimizer: 'evil_module.Quiet'"),
        (
            {"hidden_size": {"class_path": "evil_module.Quiet"}},
            "hyper_parameters.hidden_size: it is not a plain value",
        ),
    ],
    ids=["instantiator", "class-path", "unloaded-module", "nested"],
)
def test_a_crafted_checkpoint_imports_nothing(
    hyper_parameters, phrase, good_checkpoint, data_dir, tmp_path, capsys, monkeypatch
):
    marker = tmp_path / "imported"
    _evil_module(tmp_path, marker)  # importable from where the command runs
    crafted = _crafted(good_checkpoint, tmp_path / "crafted.ckpt", **hyper_parameters)
    args = ["test", *fit_args(data_dir, tmp_path / "runs", *TINY)[1:], f"--ckpt_path={crafted}"]
    code, line = _command(args, capsys, monkeypatch, folder=tmp_path)
    assert code == 1 and phrase in line, line
    assert not marker.exists() and "evil_module" not in sys.modules


@pytest.mark.parametrize("sums", ["os.system", {"sum": [1.0], "images": 64}, {"sum": 1.0}])
def test_a_checkpoint_with_crafted_training_sums_is_one_line(
    sums, good_checkpoint, data_dir, tmp_path, capsys, monkeypatch
):
    checkpoint = torch.load(good_checkpoint, weights_only=True)
    checkpoint[CROSS_ENTROPY_KEY] = sums
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    args = ["fit", *fit_args(data_dir, tmp_path / "runs", *TINY)[1:], f"--ckpt_path={crafted}"]
    code, line = _command(args, capsys, monkeypatch)
    assert code == 1
    assert line == (
        f"error: --ckpt_path {crafted}: {CROSS_ENTROPY_KEY} is not the two numbers this project "
        "writes; refusing a crafted or foreign checkpoint (nothing was run)"
    )
    assert not (tmp_path / "runs").exists()  # nothing was written


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_best_with_a_damaged_or_crafted_last_checkpoint_is_one_line(
    subcommand, good_checkpoint, data_dir, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "lightning_logs" / "sgd_0" / "checkpoints"
    folder.mkdir(parents=True)
    args = [subcommand, *fit_args(data_dir, tmp_path, *TINY)[1:], "--ckpt_path=best"]
    for content, phrase in (
        (b"", "the file is empty"),
        (good_checkpoint.read_bytes()[:50_000], "not a readable checkpoint"),
    ):
        (folder / "last.ckpt").write_bytes(content)
        code, line = _command(args, capsys, monkeypatch)
        assert code == 1
        assert line.startswith("error: --ckpt_path best: the newest run's ") and phrase in line
    marker = tmp_path / "ran"
    _crafted(good_checkpoint, folder / "last.ckpt", optimizer=_shell(marker))
    code, line = _command(args, capsys, monkeypatch)
    assert code == 1 and "hyper_parameters.optimizer" in line
    assert not marker.exists()


def _config(tmp_path, model: dict, trainer: dict | None = None):
    path = tmp_path / "handed.yaml"
    path.write_text(yaml.safe_dump({"model": model, "trainer": trainer or {}}))
    return path


@pytest.mark.parametrize(
    ("model", "phrase"),
    [
        ({"optimizer": {"class_path": "os.system", "init_args": {"command": "touch {m}"}}}, "os"),
        (
            {"lr_scheduler": {"class_path": "os.system", "init_args": {"command": "touch {m}"}}},
            "os",
        ),
        ({"optimizer": {"class_path": "evil_module.Quiet"}}, "evil_module"),
        (
            {"optimizer": {"class_path": "torch.optim.swa_utils.get_ema_avg_fn"}},
            "is not an optimizer class",
        ),
        (
            {"lr_scheduler": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}},
            "Expected 'torch.optim.SGD' to be a subclass of",
        ),
    ],
    ids=["optimizer-shell", "scheduler-shell", "import", "a-function", "an-optimizer-as-scheduler"],
)
def test_a_config_may_name_optimizer_and_scheduler_classes_only(
    model, phrase, data_dir, tmp_path, capsys, monkeypatch
):
    marker = tmp_path / "ran"
    model = yaml.safe_load(yaml.safe_dump(model).replace("{m}", str(marker)))
    _evil_module(tmp_path, tmp_path / "imported")
    args = [
        *fit_args(data_dir, tmp_path / "runs", *TINY),
        "--config",
        str(_config(tmp_path, model)),
    ]
    code, line = _command(args, capsys, monkeypatch, folder=tmp_path)
    assert code == 2
    assert line.startswith("error: ") and phrase in line, line
    assert not marker.exists() and not (tmp_path / "imported").exists()
    assert not (tmp_path / "runs").exists()


def test_a_config_may_not_import_a_module_the_user_did_not_trust(
    data_dir, tmp_path, capsys, monkeypatch
):
    marker = tmp_path / "imported"
    (tmp_path / "users_callbacks.py").write_text(  # a module of the user's own, not a test's
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from lightning.pytorch.callbacks import Callback\n"
        "class Quiet(Callback):\n    pass\n"
    )
    config = _config(tmp_path, {}, {"callbacks": [{"class_path": "users_callbacks.Quiet"}]})
    args = [*fit_args(data_dir, tmp_path / "runs", *TINY), "--config", str(config)]
    code, line = _command(args, capsys, monkeypatch, folder=tmp_path, trusted="")
    assert code == 2 and "users_callbacks" in line and not marker.exists()
    # trusted by the user's environment (a file cannot set it)
    monkeypatch.delitem(sys.modules, "users_callbacks", raising=False)
    code, _ = _command(args, capsys, monkeypatch, folder=tmp_path, trusted="users_callbacks")
    assert code == 0 and marker.exists()
    monkeypatch.delitem(sys.modules, "users_callbacks", raising=False)


def test_todays_configs_name_only_allowed_classes():
    from fashion_lightning.configs import check_model_classes

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        model = yaml.safe_load(path.read_text()).get("model") or {}
        check_model_classes(model)  # raises for a class the project does not accept


@pytest.mark.parametrize(
    ("key", "choice"),
    [("model.optimizer", "os.system"), ("weights_only", False)],  # a pickle's code, then
)
def test_a_search_file_may_not_name_a_command(key, choice, data_dir, tmp_path):
    marker = tmp_path / "ran"
    search = tmp_path / "space.yaml"
    search.write_text(yaml.safe_dump({key: {"type": "categorical", "choices": [choice]}}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fashion_lightning.tune",
            "--config",
            str(SGD_CONFIG),
            "--search",
            str(search),
            "--trials=1",
            f"--data.data_dir={data_dir}",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert key in last_line(result.stderr)
    assert not marker.exists()
    assert not list(tmp_path.rglob("trial_*"))
