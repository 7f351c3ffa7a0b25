"""FashionMNIST as a LightningDataModule: the images held in memory as tensors, a resumable
training order, batch augmentation. Finding the files is :mod:`fashion_lightning.raw_files`;
your own pictures are :mod:`fashion_lightning.pictures`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_number_type
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets import FashionMNIST

from fashion_lightning.errors import DataError
from fashion_lightning.fashion_mnist import TRAINING_IMAGES, to_float_images
from fashion_lightning.pictures import check_picture_folder, load_pictures
from fashion_lightning.raw_files import DEBIAN_SOURCE_DIR, ensure_raw_files

# validation images held out of the 60k training images: at least 1, and 1 left to train on
ValidationSize = restricted_number_type(
    "ValidationSize", int, [(">=", 1), ("<", TRAINING_IMAGES)], docstring="an int in [1, 59999]"
)
# a seed as Lightning's seed_everything takes it
Seed = restricted_number_type(
    "Seed", int, [(">=", 0), ("<", 2**32)], docstring="an int in [0, 4294967295]"
)


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


class EpochShuffleSampler(DistributedSampler):
    """A random order that is a function of ``(seed, epoch)`` alone; under DDP, this process's
    share of it: every ``world_size``-th index from ``rank`` on (padded with the order's first
    indices, so that the shares are equal, as DistributedSampler pads).

    torch's RandomSampler draws its seed from the global RNG, which checkpoints do not carry,
    so a resumed run would shuffle differently. Lightning calls ``set_epoch`` each epoch. A
    DistributedSampler itself, so that under DDP Lightning uses it as it is, instead of
    wrapping it in one that shuffles it again: each process knows where its share stands, and
    a mid-epoch resume under DDP continues exactly.
    """

    def __init__(
        self, size: int, seed: int, length: int | None = None, rank: int = 0, world_size: int = 1
    ) -> None:
        """``length``: how many indices of its share an epoch yields to this process (all by
        default)."""
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=False)
        self.size = size
        self.seed = seed
        share = -(-size // world_size)
        self.length = share if length is None else min(length, share)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, position) of a mid-epoch resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_within_epoch(self, epoch: int, start: int) -> None:
        """Make epoch ``epoch`` begin at position ``start`` of its order (a mid-epoch resume)."""
        self._resume = (epoch, start)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        start = self._resume[1] if self._resume and self._resume[0] == self.epoch else 0
        generator = torch.Generator().manual_seed((self.seed + self.epoch) % 2**64)
        order = torch.randperm(self.size, generator=generator)
        if self.num_replicas > 1:
            padding = -len(order) % self.num_replicas
            order = torch.cat([order, order[:padding]])[self.rank :: self.num_replicas]
        return iter(order[: self.length][start:].tolist())


class EvaluationShareSampler(DistributedSampler):
    """One process's share of an evaluation set under DDP: every image exactly once.

    The DistributedSampler that Lightning would add pads the shares to equal length by
    repeating images, which the epoch metrics then count twice (5001 of 5000 on 3 processes).
    Unequal shares are safe in evaluation: no collective runs per batch. (A DistributedSampler
    itself, so that Lightning does not split it again.)
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        self.indices = range(rank, len(dataset), world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def augment(
    images: Tensor, flip: bool, max_shift: int, generator: torch.Generator, cutout: int = 0
) -> Tensor:
    """Random horizontal flips, shifts of up to ``max_shift`` pixels and a square of
    ``cutout`` pixels a side erased, per image, applied to a whole batch of float images at
    once (no per-sample PIL); ``generator`` decides."""
    count = len(images)
    if flip:
        flipped = torch.rand(count, generator=generator, device=images.device) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    if max_shift > 0:
        # (x, y) of each image, in whole pixels
        shifts = torch.randint(
            -max_shift, max_shift + 1, (count, 2), generator=generator, device=images.device
        )
        images = shift_images(images, shifts, max_shift)
    if cutout > 0:
        images = erase_squares(images, cutout, generator)
    return images


def erase_squares(images: Tensor, side: int, generator: torch.Generator) -> Tensor:
    """Each image with a square of ``side`` pixels set to 0 (the background) around a random
    pixel, cut where it passes the edge (Cutout, DeVries and Taylor 2017)."""
    count, _, height, width = images.shape
    centres = torch.rand(count, 2, generator=generator, device=images.device)
    top = (centres[:, 0] * height).long() - side // 2
    left = (centres[:, 1] * width).long() - side // 2
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    square = inside_rows[:, :, None] & inside_cols[:, None, :]
    return images.masked_fill(square[:, None], 0.0)


def shift_images(images: Tensor, shifts: Tensor, max_shift: int) -> Tensor:
    """Each image moved by its whole-pixel ``(x, y)`` in ``shifts``, zeros moving in from the
    edge: one gather from the zero-padded batch. (The same pixels as torch's ``grid_sample``
    with a translation and ``nearest``, which costs six times as much on a CPU.)"""
    count, channels, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    rows = torch.arange(height, device=images.device) + max_shift + shifts[:, 1:2]
    cols = torch.arange(width, device=images.device) + max_shift + shifts[:, 0:1]
    index = rows[:, :, None] * (width + 2 * max_shift) + cols[:, None, :]
    index = index.view(count, 1, height * width).expand(count, channels, height * width)
    return padded.flatten(2).gather(2, index).view(count, channels, height, width)


class FashionMNISTDataModule(L.LightningDataModule):
    """FashionMNIST: 55k/5k seeded train/validation split of the 60k training images, official
    10k test. (A LightningDataModule's hooks are its methods, and ``__init__`` documents every
    argument for the CLI's ``--help``: longer than the project's other classes.)"""

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: PositiveInt = 64,
        eval_batch_size: PositiveInt = 1000,
        val_size: ValidationSize = 5000,
        seed: Seed = 42,
        num_workers: NonNegativeInt = 0,
        source_dir: str = DEBIAN_SOURCE_DIR,
        download: bool = True,
        data_on_device: bool = True,
        predict_dir: str | None = None,
        augment_flip: bool = False,
        augment_shift: NonNegativeInt = 0,
        augment_cutout: NonNegativeInt = 0,
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
            augment_cutout: Erase a square of this many pixels a side at a random place of
                each training image (Cutout; 0: none). Augmentation draws from ``seed`` and
                the step, so runs and resumes repeat.
        """
        super().__init__()
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
        self.augment_cutout = augment_cutout
        self._continue_at: tuple[int, int] = (0, 0)  # (epoch, batches done) of a resumed run
        self.train_set: InMemoryImages | None = None
        self.val_set: InMemoryImages | None = None
        self.test_set: InMemoryImages | None = None
        self.predict_set: InMemoryImages | None = None

    def _predicting_own_pictures(self) -> bool:
        return self.predict_dir is not None and self.trainer is not None and self.trainer.predicting

    def prepare_data(self) -> None:
        # Lightning calls this on one process per machine, before any setup()
        if self._predicting_own_pictures():
            # needs no FashionMNIST files; checked here, before a run folder is made for it
            check_picture_folder(self.predict_dir)
            return
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
            self._check_one_each(self.val_size, f"--data.val_size {self.val_size}", "images")
        if stage == "predict" and self._predicting_own_pictures():
            images, names = load_pictures(self.predict_dir)
            self._check_one_each(len(images), f"--data.predict_dir {self.predict_dir}", "pictures")
            unknown = torch.full((len(images),), -1, dtype=torch.long)
            self.predict_set = InMemoryImages(images, unknown, names).to(self._device())
            return
        if stage in ("test", "predict") and self.test_set is None:
            self.test_set = self._load(train=False)
        if stage == "predict":
            self.predict_set = self.test_set

    def _check_one_each(self, count: int, option: str, noun: str) -> None:
        """Each of several processes evaluates its share of a set, and Lightning refuses a
        share of no batch (in the middle of the stage, in that process alone)."""
        processes = self.trainer.world_size if self.trainer is not None else 1
        if count < processes:
            raise DataError(
                f"{option}: {count} {noun if count != 1 else noun[:-1]}, fewer than the "
                f"{processes} processes, each of which "
                f"evaluates one at least; run on fewer (--trainer.devices {max(count, 1)})"
            )

    def _loader(
        self, dataset: InMemoryImages, sampler: Sampler | None = None, batches_per_item: int = 1
    ) -> DataLoader:
        training = sampler is not None
        if not training and self.trainer is not None and self.trainer.world_size > 1:
            trainer = self.trainer
            sampler = EvaluationShareSampler(dataset, trainer.global_rank, trainer.world_size)
        return DataLoader(
            dataset,
            batch_size=self.batch_size * batches_per_item if training else self.eval_batch_size,
            sampler=sampler,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # its own generator: a DataLoader otherwise draws a seed from the global random
            # generator each epoch, which dropout draws from too (a resume would differ)
            generator=torch.Generator().manual_seed(self.seed),
        )

    def continue_order(self, epoch: int, images_done: int) -> None:
        """Make training continue epoch ``epoch``'s order after ``images_done`` images (a
        resumed run); called before the train loader is made."""
        self._continue_at = (epoch, images_done)

    def _steps_per_call(self) -> int:
        """Batches in one call of the model's ``training_step`` (its ``steps_per_call``)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(module, "steps_per_call", 1)

    def training_batches(self, trainer: L.Trainer | None = None) -> int:
        """Batches (optimizer steps) in one training epoch of one process,
        ``limit_train_batches`` applied; ``trainer``: the one this data will train with (its
        own, once attached), which is all it needs before ``setup``."""
        trainer = trainer or self.trainer
        processes = trainer.world_size if trainer is not None else 1
        train_size = (
            len(self.train_set) if self.train_set is not None else TRAINING_IMAGES - self.val_size
        )
        images = -(-train_size // processes)  # DDP's shares: equal, the last padded
        batches = -(-images // self.batch_size)
        limit = trainer.limit_train_batches if trainer is not None else 1.0
        if isinstance(limit, int):
            return min(batches, limit)
        return int(batches * limit) if limit < 1 else batches

    def train_dataloader(self) -> DataLoader:
        steps_per_call = self._steps_per_call()
        length = None
        if steps_per_call > 1:
            # Lightning counts --trainer.limit_train_batches in calls, which here hold several
            # batches each: the order itself stops after that many batches
            length = self.training_batches() * self.batch_size
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        processes = trainer.world_size if trainer is not None else 1
        sampler = EpochShuffleSampler(len(self.train_set), self.seed, length, rank, processes)
        epoch, done = self._continue_at
        sampler.set_epoch(epoch)  # Lightning sets it too, but only after its first iterator
        if done:
            sampler.resume_within_epoch(epoch, done)
        return self._loader(self.train_set, sampler, batches_per_item=steps_per_call)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set)

    def training_images_to_evaluate(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of training images to evaluate as validation evaluates its own: as many as
        validation evaluates (its size, ``limit_val_batches`` applied), the first of the
        training split (a fixed sample: the split is shuffled), this process's share under
        DDP, on the device, as the model gets validation batches (no augmentation).

        A plain loop, not a second validation loader: Lightning would hand these batches to
        every callback as validation batches (the confusion matrix, a user's callback)."""
        trainer = self.trainer
        count = len(self.val_set)
        share = torch.arange(trainer.global_rank, count, trainer.world_size)
        batches = trainer.num_val_batches[0] if trainer.num_val_batches else 0
        if batches != float("inf"):
            share = share[: int(batches) * self.eval_batch_size]
        device = trainer.strategy.root_device
        for index in share.split(self.eval_batch_size):
            index = index.to(self.train_set.labels.device)
            batch = (
                self.train_set.images[index].to(device),
                self.train_set.labels[index].to(device),
            )
            yield self.on_after_batch_transfer(batch, 0)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Batches stay as the data set holds them, uint8 (the model makes them floats, so
        that a checkpoint or an exported model takes images as the loaders give them), except
        where training augments them; with several steps a call, a group of batches is split
        into one batch a step."""
        if not isinstance(batch, (tuple, list)):
            return batch  # the model's example_input_array (Lightning's model summary)
        images, labels = batch
        trainer = self.trainer
        training = trainer is not None and trainer.training
        if not training or (self._steps_per_call() == 1):
            return self._augmented(images, 0), labels
        # a group of batches for several optimizer steps: views, one per step
        return [
            (self._augmented(part, i), part_labels)
            for i, (part, part_labels) in enumerate(
                zip(images.split(self.batch_size), labels.split(self.batch_size), strict=True)
            )
        ]

    def _augmented(self, images: Tensor, steps_ahead: int) -> Tensor:
        """The training batch of the optimizer step ``steps_ahead`` after the current one,
        augmented; evaluation batches as they are."""
        trainer = self.trainer
        augments = self.augment_flip or self.augment_shift or self.augment_cutout
        if trainer is None or not trainer.training or not augments:
            return images
        images = to_float_images(images)  # augmentation moves and mirrors float pixels
        generator = torch.Generator(device=images.device)
        # a function of (seed, process, step): a resumed run draws the same
        step = trainer.global_step + steps_ahead
        generator.manual_seed(hash((self.seed, trainer.global_rank, step)))
        return augment(
            images, self.augment_flip, self.augment_shift, generator, self.augment_cutout
        )
