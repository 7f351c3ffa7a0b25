"""FashionMNIST as a LightningDataModule: find and verify the raw files, keep them in memory.

Where the four raw IDX files come from, first that works wins:

1. ``<data_dir>/FashionMNIST/raw/*-ubyte`` already there (verified before use);
2. the gzip files of Debian's ``dataset-fashion-mnist`` package in ``source_dir``;
3. torchvision's own download (needs internet);
4. otherwise a one-line :class:`DataError` that names all three remedies.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import FashionMNIST

from fashion_lightning.errors import DataError

DEBIAN_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
APT_INSTALL = "apt-get install -y dataset-fashion-mnist"
CLASS_NAMES = tuple(FashionMNIST.classes)
IMAGE_SIZE = 28


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
    """Decompress ``gz_path`` next to ``target``, verify, then rename: never a half-written file."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    with os.fdopen(fd, "wb") as out:
        try:
            with gzip.open(gz_path, "rb") as src:
                shutil.copyfileobj(src, out)
            problem = None
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            problem = f"corrupt gzip ({err})"
    problem = problem or check_raw_file(tmp, expected)
    if problem:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"{gz_path}: {problem}. Reinstall it (`apt-get install --reinstall dataset-fashion-mnist`) "
            "or pass another --data.source_dir"
        )
    tmp.replace(target)


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


def ensure_writable_dir(path: Path) -> None:
    """Create ``path`` if needed and prove that a file can be written there (raises OSError).

    A real write, not ``os.access``: root passes every permission check but still cannot
    write to a read-only file system or under a regular file.
    """
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def to_fashion_mnist(picture: Image.Image) -> Tensor:
    """Make a picture look like a FashionMNIST image: 28x28 grayscale, light garment on dark.

    A dark-on-light photo is inverted; a picture of another size is cropped to the garment and
    scaled so that its longer side is 28 pixels, centred, as Zalando made the data set.
    Returns a (1, 28, 28) uint8 tensor.
    """
    gray = ImageOps.exif_transpose(picture).convert("L")
    pixels = np.asarray(gray)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 127:
        gray = ImageOps.invert(gray)
    if gray.size != (IMAGE_SIZE, IMAGE_SIZE):
        box = gray.point(lambda value: 255 if value > 40 else 0).getbbox()
        if box:
            gray = gray.crop(box)
        scale = IMAGE_SIZE / max(gray.size)
        size = tuple(max(1, round(side * scale)) for side in gray.size)
        gray = gray.resize(size, Image.LANCZOS)
        square = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        square.paste(gray, ((IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2))
        gray = square
    return torch.from_numpy(np.array(gray, dtype=np.uint8)).unsqueeze(0)


def load_pictures(folder: str | Path) -> tuple[Tensor, list[str]]:
    """All readable pictures in ``folder`` (sorted by name) as FashionMNIST-like images.

    Files that cannot be read as images are listed on stderr with the reason and skipped.

    Raises:
        DataError: the folder does not exist or holds no readable picture.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--data.predict_dir {folder}: no such folder")
    images, names, skipped = [], [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            with Image.open(path) as picture:
                images.append(to_fashion_mnist(picture))
            names.append(path.name)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            reason = "not an image" if isinstance(err, UnidentifiedImageError) else str(err)
            skipped.append(f"{path.name}: {reason}")
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if not images:
        raise DataError(
            f"--data.predict_dir {folder}: no readable picture ({len(skipped)} files skipped); "
            "put PNG or JPEG files there"
        )
    return torch.stack(images), names


class InMemoryImages(Dataset):
    """Images and labels held as tensors; a whole batch is fetched with one index.

    ``__getitems__`` lets a standard DataLoader (and the DistributedSampler Lightning injects
    under DDP) ask for a batch of indices at once, instead of one PIL conversion per sample.
    """

    def __init__(self, images: Tensor, labels: Tensor, names: list[str] | None = None) -> None:
        self.images = images  # uint8, (N, 1, 28, 28)
        self.labels = labels  # int64, (N,); -1 where unknown
        self.names = names  # file names, for pictures of your own

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, device=self.labels.device)
        return self.images[index], self.labels[index]

    def to(self, device: torch.device) -> InMemoryImages:
        return InMemoryImages(self.images.to(device), self.labels.to(device), self.names)


def keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate function for batches that ``__getitems__`` already stacked."""
    return batch


class EpochShuffleSampler(Sampler[int]):
    """A random order that is a function of ``(seed, epoch)`` alone.

    torch's RandomSampler draws its seed from the global RNG, which checkpoints do not carry,
    so a resumed run would shuffle differently. Lightning calls ``set_epoch`` each epoch.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_within_epoch(self, start: int) -> None:
        """Make the next pass begin at position ``start`` of this epoch's order (mid-epoch resume)."""
        self._start = start

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        start, self._start = self._start, 0
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[start:].tolist())


def augment(images: Tensor, flip: bool, max_shift: int, generator: torch.Generator) -> Tensor:
    """Random horizontal flips and shifts of up to ``max_shift`` pixels, per image, applied
    to a whole batch of float images at once (no per-sample PIL); ``generator`` decides."""
    count = len(images)
    if flip:
        flipped = torch.rand(count, generator=generator, device=images.device) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    if max_shift > 0:
        shifts = torch.randint(
            -max_shift, max_shift + 1, (count, 2), generator=generator, device=images.device
        )
        theta = torch.zeros(count, 2, 3, device=images.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, :, 2] = shifts.to(images.dtype) * (2 / IMAGE_SIZE)  # whole pixels
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="nearest", align_corners=False)
    return images


def to_float_images(images: Tensor) -> Tensor:
    """uint8 -> float32 in [0, 1]: exactly what torchvision's ``ToTensor()`` gives."""
    return images.float().div_(255)


class FashionMNISTDataModule(L.LightningDataModule):
    """FashionMNIST: 55k/5k seeded train/validation split of the 60k training images, official 10k test."""

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        seed: int = 42,
        num_workers: int = 0,
        source_dir: str = DEBIAN_SOURCE_DIR,
        download: bool = True,
        data_on_device: bool = True,
        predict_dir: str | None = None,
        augment_flip: bool = False,
        augment_shift: int = 0,
    ) -> None:
        """
        Args:
            data_dir: Folder that holds (or will hold) ``FashionMNIST/raw/*-ubyte``.
            batch_size: Images per training batch (one optimizer step each).
            eval_batch_size: Images per batch for validation, test and predict. Any size
                gives the same metrics; larger batches are faster.
            val_size: Training images held out for validation (seeded split); the official
                10k test split is only used by ``test``.
            seed: Seed of the train/validation split and of the per-epoch training order.
            num_workers: DataLoader worker processes; 0 is fastest for in-memory tensors.
            source_dir: Folder with the four FashionMNIST ``.gz`` files, used when the raw files
                are missing (Debian's ``dataset-fashion-mnist`` package installs them here).
            download: Let torchvision download the files when no other source has them.
            data_on_device: On a GPU, keep the whole data set (55 MB) in its memory, so that
                each batch is indexed there instead of copied from the host.
            predict_dir: A folder of your own PNG/JPEG pictures (any size) for ``predict``
                to classify; they are made to look like FashionMNIST (28x28 grayscale, light
                garment on dark). Unset: ``predict`` classifies the official test split.
            augment_flip: Flip half of the training images left-right (a garment mirrored is
                the same garment). Validation and test images are never changed.
            augment_shift: Shift each training image by up to this many pixels in x and y.
                Augmentation draws from ``seed`` and the step, so runs and resumes repeat.
        """
        super().__init__()
        if min(batch_size, eval_batch_size) < 1:
            raise ValueError(f"batch sizes must be at least 1, got {batch_size}, {eval_batch_size}")
        if not 0 < val_size < 60000:
            raise ValueError(f"val_size must be between 1 and 59999, got {val_size}")
        self.save_hyperparameters(logger=False)  # HParamsSummary logs them
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        self.source_dir = source_dir
        self.download = download
        self.data_on_device = data_on_device
        self.predict_dir = predict_dir
        self.augment_flip = augment_flip
        self.augment_shift = augment_shift
        self.train_set: InMemoryImages | None = None
        self.val_set: InMemoryImages | None = None
        self.test_set: InMemoryImages | None = None
        self.predict_set: InMemoryImages | None = None

    def _predicting_own_pictures(self) -> bool:
        return self.predict_dir is not None and self.trainer is not None and self.trainer.predicting

    def prepare_data(self) -> None:
        # Lightning calls this on one process per machine, before any setup()
        if self._predicting_own_pictures():
            return  # classifying your own pictures needs no FashionMNIST files
        raw_dir = ensure_raw_files(self.data_dir, self.source_dir, self.download)
        print(f"FashionMNIST: verified raw files in {raw_dir}", file=sys.stderr)

    def _load(self, train: bool) -> InMemoryImages:
        split = FashionMNIST(root=self.data_dir, train=train, download=False)
        return InMemoryImages(split.data.unsqueeze(1), split.targets).to(self._device())

    def _device(self) -> torch.device:
        """Where the data set lives: the accelerator when allowed, else host memory."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        # worker processes cannot index a GPU tensor created in the parent
        if not self.data_on_device or self.num_workers > 0:
            return torch.device("cpu")
        return device

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.train_set is None:
            full = self._load(train=True)
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed))
            val_index, train_index = order[: self.val_size], order[self.val_size :]
            self.train_set = InMemoryImages(full.images[train_index], full.labels[train_index])
            self.val_set = InMemoryImages(full.images[val_index], full.labels[val_index])
        if stage == "predict" and self._predicting_own_pictures():
            images, names = load_pictures(self.predict_dir)
            unknown = torch.full((len(images),), -1, dtype=torch.long)
            self.predict_set = InMemoryImages(images, unknown, names).to(self._device())
            return
        if stage in ("test", "predict") and self.test_set is None:
            self.test_set = self._load(train=False)
        if stage == "predict":
            self.predict_set = self.test_set

    def _loader(self, dataset: InMemoryImages, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if sampler is not None else self.eval_batch_size,
            sampler=sampler,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, EpochShuffleSampler(len(self.train_set), self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        images = to_float_images(images)
        trainer = self.trainer
        if trainer is not None and trainer.training and (self.augment_flip or self.augment_shift):
            generator = torch.Generator(device=images.device)
            # a function of (seed, process, step): a resumed run draws the same
            generator.manual_seed(hash((self.seed, trainer.global_rank, trainer.global_step)))
            images = augment(images, self.augment_flip, self.augment_shift, generator)
        return images, labels
