"""What TensorBoard shows, read back with TensorBoard's own reader."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fashion_lightning.cli import main
from fashion_lightning.visuals import WRONG, render_predictions
from tests.helpers import fit_args


def _events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def _values(events, tag) -> list[float]:
    return [e.value for e in events.Scalars(tag)]


@pytest.mark.slow
def test_scalars_images_and_hparams_of_a_real_run(trained_run):
    events = _events(trained_run)

    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert tag in events.Tags()["scalars"], tag
    assert len(_values(events, "train/loss")) == 20  # every 10 of 200 steps
    assert len(_values(events, "train/acc")) == len(_values(events, "val/acc")) == 2
    for tag in ("train/acc", "val/acc", "test/acc"):
        assert all(0.35 < value <= 1 for value in _values(events, tag)), tag  # chance: 0.1
    assert _values(events, "lr-SGD") == [pytest.approx(0.05)] * 20  # LearningRateMonitor

    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    ).session_start_info.hparams
    assert hparams["model/optimizer/class_path"].string_value == "torch.optim.SGD"
    assert hparams["model/optimizer/init_args/lr"].number_value == pytest.approx(0.05)
    assert hparams["model/hidden_size"].number_value == 512
    assert hparams["data/batch_size"].number_value == 64
    assert hparams["data/seed"].number_value == 42
    assert hparams["trainer/seed_everything"].string_value == "42"
    assert hparams["trainer/max_epochs"].number_value == 2
    assert _values(events, "hp_metric")[-1] == max(_values(events, "val/acc"))  # not -1

    images = events.Tags()["images"]
    assert sorted(images) == ["test/confusion_matrix", "val/confusion_matrix", "val/predictions"]
    assert len(events.Images("val/predictions")) == len(events.Images("val/confusion_matrix")) == 2
    grid = Image.open(io.BytesIO(events.Images("val/predictions")[-1].encoded_image_string))
    assert grid.size[0] > 8 * 84 and grid.size[1] > 4 * 84  # 32 images, 3x enlarged, captions


def test_images_can_be_switched_off(data_dir, tmp_path):
    main(
        fit_args(
            data_dir,
            tmp_path,
            "--images.every_n_epochs=0",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=5",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
        )
    )
    events = _events(tmp_path / "lightning_logs" / "version_0")
    assert events.Tags()["images"] == []
    assert "val/acc" in events.Tags()["scalars"]


def test_wrong_predictions_are_framed_red_and_right_ones_not():
    images = torch.zeros(2, 1, 28, 28)
    grid = render_predictions(images, predicted=torch.tensor([3, 5]), target=torch.tensor([3, 4]))
    picture = grid.permute(1, 2, 0).numpy()
    tile_width = picture.shape[1] // 8
    red = (picture == WRONG).all(axis=-1)
    assert not red[:, :tile_width].any()  # the right one: no red frame, green caption
    assert red[:, tile_width : 2 * tile_width].sum() > 4 * 84  # a frame around the wrong one
