"""A run that fails while it sets up, before it logged anything, says so in one line and
gives its run folder back: ``runs`` does not list a run that never was."""

from __future__ import annotations

import pytest

from fashion_lightning.cli import main
from fashion_lightning.runs import main as runs
from tests.helpers import TINY, fit_args


def test_a_setup_failure_is_one_line_and_leaves_no_run_folder(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(
            fit_args(
                data_dir, tmp_path, *TINY, "--trainer.callbacks+=tests.helpers.NeedsAMissingPackage"
            )
        )
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: `NeedsAMissingPackage` needs `nothing_installed`: pip install it"
    )
    assert not (tmp_path / "lightning_logs").exists()  # made for the run, given back with it
    runs(["--root", str(tmp_path)])
    assert capsys.readouterr().out.startswith("no runs in ")
