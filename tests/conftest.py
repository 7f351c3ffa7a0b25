"""Shared fixtures: the real FashionMNIST files, decompressed once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fashion_lightning.configs import TRUSTED_IMPORTS_ENV
from fashion_lightning.raw_files import DEBIAN_SOURCE_DIR, RAW_FILES, ensure_raw_files

# The tests name their own callbacks (tests/helpers.py) on command lines, as a user may name
# theirs: configs may import only what the project allows and what the user trusts.
os.environ[TRUSTED_IMPORTS_ENV] = "tests.helpers"


@pytest.fixture(scope="session")
def debian_source() -> Path:
    """Debian's FashionMNIST .gz files; the suite needs real data and fails (not skips) without it."""
    source = Path(DEBIAN_SOURCE_DIR)
    missing = [f.name for f in RAW_FILES if not (source / f"{f.name}.gz").is_file()]
    if missing:
        pytest.fail(f"{source} lacks {missing}: run `apt-get install -y dataset-fashion-mnist`")
    return source


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, debian_source) -> Path:
    """A data_dir holding the four verified raw files (shared: tests must not modify it)."""
    root = tmp_path_factory.mktemp("data")
    ensure_raw_files(root, debian_source, download=False)
    return root


@pytest.fixture
def raw_copy(tmp_path, data_dir) -> Path:
    """A private copy of the verified raw files that a test may damage; returns the data_dir."""
    target = tmp_path / "data" / "FashionMNIST" / "raw"
    shutil.copytree(data_dir / "FashionMNIST" / "raw", target)
    return tmp_path / "data"


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory) -> Path:
    """The run folder of a short real training (2 epochs of 100 batches) through the CLI."""
    from fashion_lightning.cli import main
    from tests.helpers import fit_args

    root = tmp_path_factory.mktemp("trained")
    main(
        fit_args(
            data_dir,
            root,
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=100",
            "--trainer.log_every_n_steps=10",
            "--model.optimizer.init_args.lr=0.05",
        )
    )
    return root / "lightning_logs" / "sgd_0"
