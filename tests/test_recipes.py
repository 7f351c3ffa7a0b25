"""The optimizer configs and the tuned recipe: they parse, train, schedule and augment."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fashion_lightning.cli import main
from fashion_lightning.data import (
    FashionMNISTDataModule,
    augment,
    shift_images,
    to_float_images,
)
from tests.helpers import ROOT, RecordLearningRate, built_cli

CONFIGS = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))


def test_the_expected_configs_exist():
    assert CONFIGS == ["adam", "best", "fast", "rmsprop", "sgd"]


@pytest.mark.parametrize("config", CONFIGS)
def test_each_config_parses_and_trains_a_few_batches(config, data_dir, tmp_path):
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / f"{config}.yaml"),
            f"--data.data_dir={data_dir}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.fast_dev_run=3",
        ]
    )


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_optimizer_configs_change_only_the_optimizer(optimizer):
    tutorial = (ROOT / "configs" / "sgd.yaml").read_text().splitlines()
    other = (ROOT / "configs" / f"{optimizer}.yaml").read_text().splitlines()
    settings = [line for line in tutorial if not line.startswith("#") and "momentum" not in line]
    changed = [line for line in other if not line.startswith("#") and line not in settings]
    assert len(changed) == 1 and "class_path: torch.optim." in changed[0]


def test_the_scheduler_changes_the_learning_rate_every_step(data_dir, tmp_path):
    RecordLearningRate.seen.clear()
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "best.yaml"),
            f"--data.data_dir={data_dir}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=40",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--trainer.callbacks+=tests.helpers.RecordLearningRate",
            "--model.steps_per_call=1",  # the callback looks at each call's start
        ]
    )
    seen = RecordLearningRate.seen
    assert len(seen) == 40 and len(set(seen)) == 40  # a new rate at every step
    peak = seen.index(max(seen))
    assert 0 < peak < 39  # one cycle: warms up, then anneals
    assert max(seen) == pytest.approx(1.03e-3, rel=0.05) and seen[-1] < seen[0]


def test_augment_flips_and_shifts_whole_batches_reproducibly():
    images = torch.rand(64, 1, 28, 28)

    def run(seed, flip=True, shift=2):
        return augment(images, flip, shift, torch.Generator().manual_seed(seed))

    first = run(1)
    assert first.shape == images.shape and first.dtype == images.dtype
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, run(1)) and not torch.equal(first, run(2))
    flipped = run(1, shift=0)
    same = [torch.equal(a, b) for a, b in zip(flipped, images, strict=True)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, images, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and 16 < sum(mirrored) < 48
    shifted = run(1, flip=False, shift=1)
    assert (shifted != images).any() and (shifted == 0).sum() > 0  # pixels moved in from the edge


@pytest.mark.parametrize("max_shift", [1, 2, 4])
def test_shifts_move_whole_pixels_as_a_translation_by_grid_sample_does(max_shift):
    """The gather gives the pixels of torch's own translation (runs made before it repeat)."""
    images = torch.rand(256, 1, 28, 28)
    shifts = torch.randint(-max_shift, max_shift + 1, (256, 2), generator=torch.Generator())
    theta = torch.zeros(256, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shifts.float() * (2 / 28)
    grid = torch.nn.functional.affine_grid(theta, [256, 1, 28, 28], align_corners=False)
    expected = torch.nn.functional.grid_sample(images, grid, mode="nearest", align_corners=False)
    assert torch.equal(shift_images(images, shifts, max_shift), expected)
    right = shift_images(images[:1], torch.tensor([[-1, 0]]), max_shift)  # one pixel right
    assert torch.equal(right[..., 1:], images[:1, ..., :-1]) and (right[..., 0] == 0).all()


def test_cutout_erases_one_square_of_each_image_cut_at_the_edge():
    images = torch.ones(500, 1, 28, 28)
    erased = augment(images, False, 0, torch.Generator().manual_seed(0), cutout=8)
    zeros = (erased == 0).sum(dim=(1, 2, 3))
    assert zeros.max() == 64 and zeros.min() >= 16  # whole inside, at least a quarter at a corner
    assert (zeros < 64).any()  # some squares pass the edge
    for image in erased[:50, 0]:  # one rectangle each: the square, or what of it is inside
        rows, cols = (image == 0).nonzero(as_tuple=True)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert height <= 8 and width <= 8 and len(rows) == height * width
    same = augment(images, False, 0, torch.Generator().manual_seed(0), cutout=8)
    assert torch.equal(erased, same)


def test_augmentation_applies_to_training_batches_only_and_repeats(data_dir):
    datamodule = FashionMNISTDataModule(
        data_dir=str(data_dir), augment_flip=True, augment_shift=2, seed=7
    )
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.train_dataloader()))

    def transfer(training, step):
        datamodule.trainer = SimpleNamespace(
            training=training, global_rank=0, global_step=step, lightning_module=None
        )
        return datamodule.on_after_batch_transfer((images, labels), 0)

    augmented, same_labels = transfer(training=True, step=5)
    assert torch.equal(same_labels, labels)
    assert augmented.shape == (64, 1, 28, 28) and augmented.min() >= 0 and augmented.max() <= 1
    assert not torch.equal(augmented, to_float_images(images))
    assert torch.equal(transfer(training=True, step=5)[0], augmented)  # same seed and step
    assert not torch.equal(transfer(training=True, step=6)[0], augmented)
    assert torch.equal(transfer(training=False, step=5)[0], images)  # as they are: uint8


def _network_of(config: str, tmp_path) -> list[tuple[str, list[tuple[int, ...]]]]:
    cli = built_cli(
        "--config",
        str(ROOT / "configs" / f"{config}.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
    )
    # the layers in order and their weights' shapes; dropout is allowed (it has no weights)
    layers = [m for m in cli.model.model.modules() if not list(m.children())]
    return [
        (type(m).__name__, [tuple(p.shape) for p in m.parameters()])
        for m in layers
        if not isinstance(m, torch.nn.Dropout)
    ]


@pytest.mark.parametrize("config", ["best", "fast"])
def test_the_tuned_recipes_train_the_tutorials_network(config, tmp_path):
    assert _network_of(config, tmp_path / config) == _network_of("sgd", tmp_path / "sgd")
