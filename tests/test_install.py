"""Installed, not only cloned: ``fit`` alone is the tutorial's run, the configs ship with the
package (``--config sgd``, or ``configs/sgd.yaml`` from any folder), and the README's commands
work from the ``fashion-lightning`` command of a wheel installed into a new environment."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from fashion_lightning.cli import main
from tests.helpers import ROOT

TINY_RUN = (
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1",
    "--trainer.enable_progress_bar=false",
)


def _printed_config(capsys, *args: str) -> str:
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return capsys.readouterr().out


def test_fit_alone_is_the_tutorials_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the names are the package's
    alone = _printed_config(capsys)
    assert alone == _printed_config(capsys, "--config", str(ROOT / "configs" / "sgd.yaml"))
    assert alone == _printed_config(capsys, "--config", "sgd")
    assert alone == _printed_config(capsys, "--config", "configs/sgd.yaml")
    for line in ("seed_everything: 42", "max_epochs: 10", "lr: 0.001", "batch_size: 64"):
        assert f"\n{line}" in alone or f" {line}\n" in alone, line
    assert "steps_per_call: 16" in alone


def test_the_configs_ship_in_the_package_and_the_repositorys_folder_links_them():
    packaged = ROOT / "fashion_lightning" / "configs"
    assert (ROOT / "configs").resolve() == packaged.resolve()
    shipped = {p.relative_to(packaged) for p in packaged.rglob("*.yaml")}
    patterns = ("*.yaml", "search/*.yaml")  # pyproject.toml's package-data
    assert (
        "fashion_lightning = [" + ", ".join(f'"configs/{p}"' for p in patterns) + "]"
        in (ROOT / "pyproject.toml").read_text()
    )
    assert {"sgd.yaml", "adam.yaml", "rmsprop.yaml", "best.yaml", "fast.yaml"} <= {
        str(p) for p in shipped
    }
    assert all(any(p.match(pattern) for pattern in patterns) for p in shipped)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel of this source tree, pip-installed into a new environment that borrows the
    shared environment's packages (torch...) through a .pth file: its bin folder."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(
        ROOT / "fashion_lightning",
        source / "fashion_lightning",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = root / "dist"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], check=True
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    own = subprocess.run(
        [python, "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(own, "shared.pth").write_text(site.getsitepackages()[0] + "\n")
    # --no-index: the dependencies must be found installed, nothing is downloaded
    wheel = next(wheels.glob("*.whl"))
    subprocess.run([*pip, "--python", python, "install", "--no-index", wheel], check=True)
    return venv / "bin"


@pytest.mark.slow
def test_the_readmes_commands_work_from_the_installed_command(installed, data_dir, tmp_path):
    def command(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [installed / "fashion-lightning", *args],
            cwd=tmp_path,  # another folder than the repository's: no configs/ here
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, (args, done.stderr[-3000:])
        return done

    data = f"--data.data_dir={data_dir}"
    assert "'runs' compares the runs" in command("--help").stdout
    command("fit", "--config", "configs/sgd.yaml", data, *TINY_RUN)
    command(
        "fit",
        "--config",
        "configs/sgd.yaml",
        data,
        *TINY_RUN,
        "--trainer.max_epochs=2",
        "--ckpt_path",
        "last",
    )
    command("test", "--config", "configs/sgd.yaml", data, *TINY_RUN, "--ckpt_path", "best")
    predicted = command("predict", "--config", "sgd", data, *TINY_RUN, "--ckpt_path", "best")
    assert "test images, accuracy" in predicted.stdout and "sgd_2" in predicted.stdout
    assert "--ckpt_path CKPT_PATH" in command("fit", "--help").stdout
    table = command("runs").stdout.splitlines()
    assert table[1].split()[:3] == ["sgd_0", "sgd", "2/2"]
    refused = subprocess.run(
        [installed / "fashion-lightning", "runs", "--bogus"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert refused.stderr.startswith(
        "error: unrecognized arguments: --bogus (see: fashion-lightning runs --help)"
    )
