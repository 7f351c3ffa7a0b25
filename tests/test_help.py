"""``--help`` says what this project does: the commands, the callbacks a config may name,
``--ckpt_path`` as the project reads it, and what a search passes to its trials."""

from __future__ import annotations

import re
import sys

import pytest

from fashion_lightning.cli import main


def _help(capsys, monkeypatch, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", ["python -m fashion_lightning"])
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_the_command_names_runs_and_the_shipped_configs(capsys, monkeypatch):
    shown = _help(capsys, monkeypatch)
    assert "'runs' compares the runs in lightning_logs/" in shown
    assert (
        "sgd (the tutorial, as 'fit' alone), adam, rmsprop, best (the tuned recipe), fast (the speedrun)"
        in shown
    )


def test_the_callbacks_listed_are_those_a_config_may_name(capsys, monkeypatch):
    shown = _help(capsys, monkeypatch, "fit")
    listed = re.search(r"--trainer\.callbacks\+ CALLBACKS .*?known subclasses: ([^)]*)\)", shown)
    names = listed.group(1).replace(" ", "").split(",")
    assert "lightning.pytorch.callbacks.LearningRateMonitor" in names
    assert "lightning.pytorch.callbacks.EMAWeightAveraging" in names
    # the project's own callbacks (always on), SWA (refused), and the import policy's refusals
    assert not [n for n in names if n.startswith(("fashion_lightning.", "lightning.Callback"))]
    assert "lightning.pytorch.callbacks.StochasticWeightAveraging" not in names
    assert "lightning.pytorch.cli.SaveConfigCallback" not in names


def test_ckpt_path_says_what_last_and_best_find(capsys, monkeypatch):
    shown = _help(capsys, monkeypatch, "test")
    assert (
        "--ckpt_path CKPT_PATH The checkpoint to start from: 'last' (fit: continue the newest run of this config, also from a new process"
        in shown
    )
    assert "hpc" not in shown.split("--ckpt_path CKPT_PATH")[1].split("--")[0]


def test_the_search_says_what_goes_to_every_trial(capsys):
    from fashion_lightning.tune.command import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert (
        "the fit command line's --trainer.*, --model.*, --data.*, --checkpoint.*, --images.* and --seed_everything go to every trial"
        in shown
    )
