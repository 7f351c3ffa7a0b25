"""Finding, verifying and unpacking the four FashionMNIST IDX files.

Where the raw files come from, first that works wins:

1. ``<data_dir>/FashionMNIST/raw/*-ubyte`` already there (verified before use);
2. the gzip files of Debian's ``dataset-fashion-mnist`` package in ``source_dir``;
3. torchvision's own download (needs internet);
4. otherwise a one-line :class:`DataError` that names all three remedies.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets import FashionMNIST

from fashion_lightning.errors import DataError
from fashion_lightning.fashion_mnist import IMAGE_SIZE
from fashion_lightning.files import atomic_write, ensure_writable_dir

DEBIAN_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
APT_INSTALL = "apt-get install -y dataset-fashion-mnist"


@dataclass(frozen=True)
class RawFile:
    """Facts about one decompressed FashionMNIST file (measured once from the Debian package)."""

    name: str
    magic: int  # IDX magic: 2051 = uint8 images (3 dims), 2049 = uint8 labels (1 dim)
    count: int
    sha256: str

    @property
    def header_size(self) -> int:
        return 16 if self.magic == 2051 else 8

    @property
    def size(self) -> int:
        item = IMAGE_SIZE * IMAGE_SIZE if self.magic == 2051 else 1
        return self.header_size + self.count * item


RAW_FILES = (
    RawFile(
        "train-images-idx3-ubyte",
        2051,
        60000,
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    RawFile(
        "train-labels-idx1-ubyte",
        2049,
        60000,
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    RawFile(
        "t10k-images-idx3-ubyte",
        2051,
        10000,
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    RawFile(
        "t10k-labels-idx1-ubyte",
        2049,
        10000,
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
)


def check_raw_file(path: Path, expected: RawFile) -> str | None:
    """Return what is wrong with ``path`` as a short phrase, or None if it is the expected file.

    The header is checked before the checksum so that the message says *how* a file is wrong
    (truncated, not an IDX file, wrong count, bad label) instead of only "checksum mismatch".
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(expected.header_size)
    if len(header) < 8:
        return f"too short to be an IDX file ({size} bytes)"
    magic, count = struct.unpack(">II", header[:8])
    if magic != expected.magic:
        return (
            f"wrong magic number {magic} (expected {expected.magic}): not a FashionMNIST IDX file"
        )
    if count != expected.count:
        return f"header says {count} items, expected {expected.count}"
    if expected.magic == 2051 and header[8:] != struct.pack(">II", IMAGE_SIZE, IMAGE_SIZE):
        return f"images are not {IMAGE_SIZE}x{IMAGE_SIZE}"
    if size != expected.size:
        state = "truncated" if size < expected.size else "has trailing bytes"
        return f"{state}: {size} bytes, expected {expected.size}"
    data = path.read_bytes()
    if expected.magic == 2049:
        labels = torch.frombuffer(bytearray(data[expected.header_size :]), dtype=torch.uint8)
        bad = torch.nonzero(labels > 9)
        if len(bad):
            i = int(bad[0])
            return f"label {int(labels[i])} at item {i} is outside 0-9"
    if hashlib.sha256(data).hexdigest() != expected.sha256:
        return "contents differ from FashionMNIST (sha256 mismatch)"
    return None


def _fix_hint(source_dir: Path) -> str:
    return (
        f"delete it and run again to restore it from {source_dir} (`{APT_INSTALL}`) "
        "or by download (`--data.download true`)"
    )


def _decompress(gz_path: Path, target: Path, expected: RawFile) -> None:
    """Decompress ``gz_path`` into ``target``, verified before it takes the name: never a
    half-written or wrong file (an interrupted run leaves no partial file either)."""
    try:
        # atomic_write creates the file as any other (mkstemp would make it 0600, unreadable
        # to the other users of a shared data folder)
        with atomic_write(target) as out:
            with gzip.open(gz_path, "rb") as src:
                shutil.copyfileobj(src, out)
            out.flush()
            problem = check_raw_file(Path(out.name), expected)
            if problem:
                raise _Refused(problem)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        problem = f"corrupt gzip ({err})"
    except _Refused as err:
        problem = str(err)
    else:
        return
    raise DataError(
        f"{gz_path}: {problem}. Reinstall it (`apt-get install --reinstall dataset-fashion-mnist`) "
        "or pass another --data.source_dir"
    )


class _Refused(Exception):
    """The unpacked file is not the one expected (kept from replacing the target)."""


def _download(data_dir: Path) -> str | None:
    """torchvision's FashionMNIST download into ``<data_dir>/FashionMNIST/raw``; the error or None."""
    try:
        FashionMNIST(root=str(data_dir), train=False, download=True)
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError...
        # torchvision's message is several lines; the last one holds the actual cause
        lines = str(err).strip().splitlines() or [type(err).__name__]
        return f"download failed: {lines[-1]}"
    return None


def ensure_raw_files(data_dir: str | Path, source_dir: str | Path, download: bool) -> Path:
    """Make sure the four verified raw files are in ``<data_dir>/FashionMNIST/raw``; return that folder.

    Raises:
        DataError: a file is damaged, or no source has the missing files.
    """
    data_dir, source_dir = Path(data_dir), Path(source_dir)
    raw_dir = data_dir / "FashionMNIST" / "raw"
    missing = []
    for expected in RAW_FILES:
        path = raw_dir / expected.name
        if path.exists():
            problem = check_raw_file(path, expected)
            if problem:
                raise DataError(f"{path}: {problem}; {_fix_hint(source_dir)}")
            continue
        gz_path = source_dir / f"{expected.name}.gz"
        if gz_path.is_file():
            _make_dir(raw_dir)
            _decompress(gz_path, path, expected)
        else:
            missing.append(expected)
    if not missing:
        return raw_dir

    if download:
        _make_dir(raw_dir)
    download_error = _download(data_dir) if download else "not tried (--data.download false)"
    if download_error is None:
        for expected in missing:
            problem = check_raw_file(raw_dir / expected.name, expected)
            if problem:
                raise DataError(f"{raw_dir / expected.name}: downloaded file {problem}")
        return raw_dir
    names = ", ".join(f.name for f in missing)
    raise DataError(
        f"FashionMNIST not found ({names}). Either put the raw files in {raw_dir}, "
        f"or install Debian's copy into {source_dir} (`{APT_INSTALL}`) "
        f"or point --data.source_dir at a folder with the .gz files, "
        f"or download them (--data.download true, needs internet; {download_error})"
    )


def _make_dir(path: Path) -> None:
    try:
        ensure_writable_dir(path)
    except OSError as err:
        raise DataError(
            f"cannot write to {path} ({err}); pass a writable --data.data_dir"
        ) from None
