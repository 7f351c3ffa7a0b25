"""Where FashionMNIST comes from, how damage is reported, and what the loaders yield."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import signal
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torchvision.datasets import FashionMNIST
from torchvision.transforms import ToTensor

from fashion_lightning.data import EpochShuffleSampler, FashionMNISTDataModule
from fashion_lightning.errors import DataError
from fashion_lightning.fashion_mnist import to_float_images
from fashion_lightning.raw_files import RAW_FILES, ensure_raw_files
from tests.helpers import fit_args, last_line, start_cli

RAW = "FashionMNIST/raw"


def _digests(raw_dir: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256((raw_dir / f.name).read_bytes()).hexdigest() for f in RAW_FILES}


def test_present_raw_files_are_used_without_any_source(raw_copy, tmp_path):
    raw_dir = raw_copy / RAW
    before = {p.name: p.stat().st_mtime_ns for p in raw_dir.iterdir()}
    assert ensure_raw_files(raw_copy, tmp_path / "no-source", download=False) == raw_dir
    assert {p.name: p.stat().st_mtime_ns for p in raw_dir.iterdir()} == before


def test_missing_raw_files_are_decompressed_from_the_debian_source(tmp_path, debian_source):
    raw_dir = ensure_raw_files(tmp_path / "data", debian_source, download=False)
    assert _digests(raw_dir) == {f.name: f.sha256 for f in RAW_FILES}
    assert sorted(p.name for p in raw_dir.iterdir()) == sorted(f.name for f in RAW_FILES)


def test_unpacked_files_are_readable_by_others_as_the_umask_allows(tmp_path, debian_source):
    old_umask = os.umask(0o022)
    try:
        raw_dir = ensure_raw_files(tmp_path / "data", debian_source, download=False)
    finally:
        os.umask(old_umask)
    assert {oct(p.stat().st_mode & 0o777) for p in raw_dir.iterdir()} == {"0o644"}


def test_only_the_missing_file_is_taken_from_the_source(raw_copy, debian_source):
    raw_dir = raw_copy / RAW
    kept = raw_dir / "train-images-idx3-ubyte"
    kept_mtime = kept.stat().st_mtime_ns
    (raw_dir / "t10k-labels-idx1-ubyte").unlink()
    ensure_raw_files(raw_copy, debian_source, download=False)
    assert (raw_dir / "t10k-labels-idx1-ubyte").is_file()
    assert kept.stat().st_mtime_ns == kept_mtime


@pytest.fixture
def loopback_mirror(tmp_path, debian_source, monkeypatch):
    """Serve Debian's .gz files over HTTP on 127.0.0.1 and point torchvision's download there.

    The only stand-in is the internet itself: torchvision's real download code runs. Debian
    recompressed the files, so the gzip checksums torchvision knows are replaced by theirs.
    """
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    resources = []
    for f in RAW_FILES:
        gz = shutil.copy(debian_source / f"{f.name}.gz", mirror)
        resources.append((f"{f.name}.gz", hashlib.md5(Path(gz).read_bytes()).hexdigest()))
    handler = partial(SimpleHTTPRequestHandler, directory=str(mirror))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(FashionMNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
    monkeypatch.setattr(FashionMNIST, "resources", resources)
    yield
    server.shutdown()
    server.server_close()


@pytest.mark.usefixtures("loopback_mirror")
def test_download_is_used_when_neither_raw_files_nor_source_exist(tmp_path):
    raw_dir = ensure_raw_files(tmp_path / "data", tmp_path / "no-source", download=True)
    assert _digests(raw_dir) == {f.name: f.sha256 for f in RAW_FILES}


def test_no_source_is_one_line_naming_all_three_remedies(tmp_path):
    with pytest.raises(DataError) as err:
        ensure_raw_files(tmp_path / "data", tmp_path / "no-source", download=False)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "data" / RAW) in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "--data.download true" in message


def test_failed_download_is_reported_with_the_other_remedies(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist") as err:
        ensure_raw_files(tmp_path / "data", tmp_path / "no-source", download=True)
    assert "download failed: <urlopen error [Errno 111] Connection refused>" in str(err.value)


def _damage(path: Path, offset: int, data: bytes) -> None:
    content = bytearray(path.read_bytes())
    content[offset : offset + len(data)] = data
    path.write_bytes(bytes(content))


@pytest.mark.parametrize(
    ("name", "damage", "phrase"),
    [
        ("train-images-idx3-ubyte", lambda p: p.write_bytes(p.read_bytes()[:-1000]), "truncated"),
        ("t10k-labels-idx1-ubyte", lambda p: _damage(p, 0, b"\x00\x00\x08\x03"), "magic"),
        (
            "t10k-labels-idx1-ubyte",
            lambda p: _damage(p, 4, (9999).to_bytes(4, "big")),
            "9999 items",
        ),
        ("train-labels-idx1-ubyte", lambda p: _damage(p, 8 + 123, b"\x0c"), "label 12 at item 123"),
        ("t10k-images-idx3-ubyte", lambda p: _damage(p, 5000, b"\xff\xfe"), "sha256"),
    ],
)
def test_damaged_raw_file_is_reported_by_path_and_kept(
    raw_copy, debian_source, name, damage, phrase
):
    path = raw_copy / RAW / name
    damage(path)
    damaged = path.read_bytes()
    with pytest.raises(DataError) as err:
        ensure_raw_files(raw_copy, debian_source, download=False)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and phrase in message and "\n" not in message
    assert "delete it" in message
    assert path.read_bytes() == damaged  # the user's file is reported, not silently replaced


def test_corrupt_gzip_in_source_is_reported_and_leaves_no_partial_file(tmp_path, debian_source):
    source = tmp_path / "source"
    shutil.copytree(debian_source, source)
    gz = source / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:2000])
    with pytest.raises(DataError, match="corrupt gzip") as err:
        ensure_raw_files(tmp_path / "data", source, download=False)
    assert str(err.value).startswith(str(gz))
    assert not (tmp_path / "data" / RAW / "train-labels-idx1-ubyte").exists()
    assert not list((tmp_path / "data" / RAW).glob(".*part"))


def test_gzip_with_altered_content_is_reported(tmp_path, debian_source):
    source = tmp_path / "source"
    shutil.copytree(debian_source, source)
    gz = source / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(gz.read_bytes()))
    content[8] = 42
    gz.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(DataError, match="label 42 at item 0 is outside 0-9"):
        ensure_raw_files(tmp_path / "data", source, download=False)


@pytest.fixture(scope="module")
def datamodule(data_dir):
    dm = FashionMNISTDataModule(data_dir=str(data_dir), source_dir="/nonexistent")
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_batches_equal_the_tutorials_to_tensor(datamodule, data_dir):
    tutorial = FashionMNIST(root=str(data_dir), train=False, transform=ToTensor())
    images, labels = next(iter(datamodule.test_dataloader()))
    images, labels = datamodule.on_after_batch_transfer((images, labels), 0)
    expected = torch.stack([tutorial[i][0] for i in range(len(labels))])
    # uint8 as held; the model makes them floats, exactly ToTensor's
    assert images.dtype == torch.uint8 and images.shape == (1000, 1, 28, 28)
    assert torch.equal(to_float_images(images), expected)
    assert labels.tolist() == [tutorial[i][1] for i in range(len(labels))]


def test_split_is_seeded_disjoint_and_keeps_the_test_set_apart(datamodule, data_dir):
    assert (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)) == (
        55000,
        5000,
        10000,
    )
    again = FashionMNISTDataModule(data_dir=str(data_dir), seed=42)
    again.setup("fit")
    assert torch.equal(again.val_set.images, datamodule.val_set.images)
    other = FashionMNISTDataModule(data_dir=str(data_dir), seed=7)
    other.setup("fit")
    assert not torch.equal(other.val_set.labels, datamodule.val_set.labels)
    # every training image is in exactly one of train/val
    train_full = FashionMNIST(root=str(data_dir), train=True)
    assert len(datamodule.train_set) + len(datamodule.val_set) == len(train_full)
    assert torch.equal(
        torch.sort(torch.cat([datamodule.train_set.labels, datamodule.val_set.labels])).values,
        torch.sort(train_full.targets).values,
    )


def test_train_order_is_a_function_of_seed_and_epoch():
    def order(seed, epoch):
        sampler = EpochShuffleSampler(1000, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(42, 3) == order(42, 3)
    assert order(42, 3) != order(42, 4)
    assert order(42, 3) != order(1, 3)
    assert sorted(order(42, 3)) == list(range(1000))


def test_only_the_train_loader_shuffles_and_evaluation_keeps_the_last_batch(data_dir):
    datamodule = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=64, eval_batch_size=300)
    datamodule.setup("fit")
    datamodule.setup("test")
    train = datamodule.train_dataloader()
    assert isinstance(train.sampler, EpochShuffleSampler) and train.batch_size == 64
    for loader, size in (
        (datamodule.val_dataloader(), 5000),
        (datamodule.test_dataloader(), 10000),
    ):
        assert not loader.drop_last
        assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)
        batches = list(loader)
        assert sum(len(labels) for _, labels in batches) == size
        assert len(batches[-1][1]) == size % 300


def _start_unpacking(tmp_path):
    """A fit on an empty data folder, and the raw folder it unpacks Debian's files into."""
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    process = start_cli(*fit_args(tmp_path / "data", tmp_path, "--trainer.max_epochs=1"))
    deadline = time.monotonic() + 60
    while not list(raw.glob(".train-images-idx3-ubyte.*.part")):  # the largest: 47 MB
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.001)
    return process, raw


@pytest.mark.slow
def test_ctrl_c_while_unpacking_stops_with_130_and_leaves_nothing_half_done(tmp_path):
    process, raw = _start_unpacking(tmp_path)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert last_line(process.stderr.read()) == "error: stopped by SIGINT; nothing was saved"
    assert not list(raw.glob(".*.part"))
    assert not list(tmp_path.glob("lightning_logs/*"))  # no run folder left behind


@pytest.mark.slow
def test_a_kill_9_while_unpacking_leaves_a_part_file_that_the_next_run_removes(
    tmp_path, debian_source
):
    process, raw = _start_unpacking(tmp_path)
    process.kill()
    process.wait(timeout=60)
    assert list(raw.glob(".*.part"))
    ensure_raw_files(tmp_path / "data", debian_source, download=False)
    assert not list(raw.glob(".*.part"))
