"""What TensorBoard shows, read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch
from google.protobuf.json_format import MessageToDict
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from fashion_lightning.cli import main
from fashion_lightning.data import FashionMNISTDataModule
from fashion_lightning.drawings import (
    CELL_H,
    CELL_W,
    LEFT,
    RIGHT,
    TOP,
    WRONG,
    render_confusion_matrix,
    render_predictions,
    share_colour,
)
from fashion_lightning.fashion_mnist import CLASS_NAMES
from fashion_lightning.model import ImageClassifier
from fashion_lightning.visuals import EPOCH_CURVES
from tests.helpers import ROOT, RecordCrossEntropy, fit_args


def _events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def _values(events, tag) -> list[float]:
    return [e.value for e in events.Scalars(tag)]


def _session_hparams(events) -> dict:
    data = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(data).session_start_info.hparams
    return {name: MessageToDict(value) for name, value in hparams.items()}


def _experiment(events):
    data = events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    return plugin_data_pb2.HParamsPluginData.FromString(data).experiment


@pytest.mark.slow
def test_scalars_images_and_hparams_of_a_real_run(trained_run):
    events = _events(trained_run)

    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert tag in events.Tags()["scalars"], tag
    assert len(_values(events, "train/loss")) == 20  # every 10 of 200 steps
    assert len(_values(events, "train/acc")) == len(_values(events, "val/acc")) == 2
    for tag in ("train/acc", "val/acc", "test/acc"):
        assert all(0.35 < value <= 1 for value in _values(events, tag)), tag  # chance: 0.1
    assert _values(events, "train/lr") == [pytest.approx(0.05)] * 20
    assert "epoch" not in events.Tags()["scalars"]  # a staircase that sorted first

    hparams = _session_hparams(events)
    assert hparams["optimizer"] == "SGD"
    assert hparams["lr"] == "0.05"  # as written, not 0.050000 as TensorBoard shows a number
    assert hparams["batch_size"] == "64"  # not 64.000
    assert hparams["flip_tta"] is False  # every knob that changes a result is a column
    assert hparams["epochs"] == "2"
    assert hparams["seed"] == "42"
    assert _values(events, "hp_metric")[-1] == max(_values(events, "val/acc"))  # not -1
    best = _values(events, "val/acc").index(max(_values(events, "val/acc"))) + 1
    assert _values(events, "val/best_epoch")[-1] == best  # counted from 1

    images = events.Tags()["images"]
    assert sorted(images) == ["test/confusion_matrix", "val/confusion_matrix", "val/predictions"]
    assert len(events.Images("val/predictions")) == len(events.Images("val/confusion_matrix")) == 2
    for tag in ("val/predictions", "val/confusion_matrix"):  # drawn for a ~400 px card
        picture = Image.open(io.BytesIO(events.Images(tag)[-1].encoded_image_string))
        assert 360 <= picture.size[0] <= 420 and 300 <= picture.size[1] <= 440, picture.size


@pytest.fixture(scope="module")
def adam_run(data_dir, tmp_path_factory):
    """Adam with label smoothing: the loss it optimizes is not the cross-entropy validated."""
    root = tmp_path_factory.mktemp("adam")
    RecordCrossEntropy.seen.clear()
    main(
        fit_args(
            data_dir,
            root,
            f"--config={ROOT / 'configs' / 'adam.yaml'}",
            "--model.label_smoothing=0.1",
            "--model.steps_per_call=1",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=20",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.callbacks+=tests.helpers.RecordCrossEntropy",
        )
    )
    return root / "lightning_logs" / "sgd+adam_0"  # named after its two config files


@pytest.mark.slow
def test_two_runs_with_different_optimizers_compare_at_a_glance(trained_run, adam_run):
    sgd, adam = _events(trained_run), _events(adam_run)

    # HParams: the same columns, the optimizer and its learning rate among the five shown
    # first, no machine paths, and the metric columns
    columns = {run: _session_hparams(events) for run, events in (("sgd", sgd), ("adam", adam))}
    assert columns["sgd"].keys() == columns["adam"].keys()
    assert columns["sgd"]["optimizer"] != columns["adam"]["optimizer"] == "Adam"
    assert columns["adam"]["lr"] == "0.001"
    assert columns["adam"]["momentum"] == "0"  # Adam has none: 0, not a missing cell
    for hparams in columns.values():
        texts = [str(value) for value in hparams.values()]
        assert not [text for text in texts if "/" in text or "data" in text], texts
    experiment = _experiment(adam)
    shown = sorted(info.name for info in experiment.hparam_infos if info.differs)
    assert shown == ["batch_size", "epochs", "lr", "optimizer", "scheduler"]
    assert [m.name.tag for m in experiment.metric_infos] == [
        "hp_metric",
        "val/best_epoch",
        "test/acc",
        "val/acc",
        "val/loss",
        "train_eval/acc_gap",
    ]

    for events in (sgd, adam):
        scalars = events.Tags()["scalars"]
        assert "train/lr" in scalars and not [tag for tag in scalars if tag.startswith("lr-")]
        for stage in ("val", "test"):
            per_class = [tag for tag in scalars if tag.startswith(f"{stage}/acc_class/")]
            assert sorted(per_class) == sorted(
                f"{stage}/acc_class/{name.replace('/', '_')}" for name in CLASS_NAMES
            )
        # the pictures and hp_metric sit at the step of the validation they show
        val_steps = [e.step for e in events.Scalars("val/acc")]
        for tag in ("val/predictions", "val/confusion_matrix"):
            assert [e.step for e in events.Images(tag)] == val_steps, tag
        assert [e.step for e in events.Scalars("hp_metric")] == val_steps
        assert [e.step for e in events.Images("test/confusion_matrix")] == [
            e.step for e in events.Scalars("test/acc")
        ]

        _check_layout(events)

        # Time Series sorts its groups by name and opens the first two: the learning curves
        # against epochs first, the gap as its first card, each validation at the epoch it
        # ends, for any batch size
        tags = [*events.Tags()["scalars"], *events.Tags()["images"]]
        assert sorted({tag.split("/")[0] for tag in tags})[:2] == ["epoch", "hp_metric"]
        assert sorted(tag for tag in tags if tag.startswith("epoch/")) == [
            "epoch/acc_gap",
            "epoch/acc_train",
            "epoch/acc_val",
            "epoch/loss_gap",
            "epoch/loss_train",
            "epoch/loss_val",
        ]
        for source, curve in EPOCH_CURVES.items():
            assert [(e.step, e.value) for e in events.Scalars(curve)] == [
                (epoch, e.value) for epoch, e in enumerate(events.Scalars(source), start=1)
            ], curve


def _check_layout(events) -> None:
    """Custom Scalars, as the printed link opens it: does it overfit (the gaps), then train next
    to val, then the steps; one tag a chart, so that a run's line is told by its colour alone
    (TensorBoard tells a chart's tags apart by marker shapes it hands out per run); every chart
    drawn from what the run wrote."""
    layout = layout_pb2.Layout.FromString(
        events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    assert [[list(chart.multiline.tag) for chart in cat.chart] for cat in layout.category] == [
        [["^epoch/acc_gap$"], ["^epoch/loss_gap$"]],
        [["^epoch/acc_val$"], ["^epoch/acc_train$"]],
        [["^epoch/loss_val$"], ["^epoch/loss_train$"]],
        [["^train/loss$"], ["^train/lr$"]],
        [["^val/acc_class/"], ["^test/acc_class/"]],
    ]
    assert layout.category[0].title.startswith("Does it overfit?")
    titles = [chart.title for cat in layout.category for chart in cat.chart]
    assert titles[0].startswith("accuracy gap: train minus val")
    assert "Ignore outliers" in titles[7]  # TensorBoard cuts a one-cycle's ends by default
    scalars = events.Tags()["scalars"]
    for cat in layout.category:
        for chart in cat.chart:
            (pattern,) = chart.multiline.tag
            assert any(re.match(pattern, tag) for tag in scalars), pattern


def test_a_validation_within_an_epoch_is_not_drawn_as_the_epochs_end(data_dir, tmp_path):
    main(
        fit_args(
            data_dir,
            tmp_path,
            "--trainer.val_check_interval=0.5",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
        )
    )
    events = _events(tmp_path / "lightning_logs" / "sgd_0")
    validations = events.Scalars("val/acc")
    assert [e.step for e in validations] == [2, 4]
    assert [(e.step, e.value) for e in events.Scalars("epoch/acc_val")] == [
        (1, validations[-1].value)
    ]


@pytest.mark.parametrize("steps_per_call", [1, 16])
def test_a_run_that_max_steps_ends_within_an_epoch_draws_no_partial_epoch(
    steps_per_call, data_dir, tmp_path
):
    main(
        fit_args(
            data_dir,
            tmp_path,
            f"--model.steps_per_call={steps_per_call}",
            "--trainer.max_steps=6",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
        )
    )
    events = _events(tmp_path / "lightning_logs" / "sgd_0")
    assert [e.step for e in events.Scalars("train/acc")] == [4, 6]  # Lightning ends both
    assert [e.step for e in events.Scalars("epoch/acc_train")] == [1]


def test_train_and_val_are_measured_alike_and_their_gaps_drawn(adam_run):
    """Label smoothing changes the loss optimized (train/loss), not the one compared with val:
    train_eval/* is the training images evaluated as validation's (plain cross-entropy, no
    dropout or augmentation, the same weights), drawn against epochs with the gaps. The
    running values of the epoch's training batches stay as train/acc and train/cross_entropy,
    each epoch's plain cross-entropy of its batches."""
    events = _events(adam_run)
    train, val = _values(events, "train_eval/acc"), _values(events, "val/acc")
    train_loss, val_loss = _values(events, "train_eval/loss"), _values(events, "val/loss")
    assert len(train) == len(val) == 2
    assert _values(events, "train_eval/acc_gap") == pytest.approx(
        [t - v for t, v in zip(train, val, strict=True)], abs=1e-6
    )
    assert _values(events, "train_eval/loss_gap") == pytest.approx(
        [v - t for t, v in zip(train_loss, val_loss, strict=True)], abs=1e-6
    )
    assert _values(events, "epoch/loss_train") == train_loss
    running = _values(events, "train/cross_entropy")
    optimized = _values(events, "train/loss")  # every step, label-smoothed
    for epoch, value in enumerate(running):
        seen = [(loss, n) for at, loss, n in RecordCrossEntropy.seen if at == epoch]
        assert len(seen) == 20
        assert value == pytest.approx(sum(loss * n for loss, n in seen) / 20 / 64, rel=1e-5)
        smoothed = sum(optimized[epoch * 20 : (epoch + 1) * 20]) / 20
        assert smoothed - value > 0.05  # what the chart used to draw against val/loss


@pytest.mark.slow
def test_under_a_weight_average_train_and_val_use_the_same_weights(data_dir, tmp_path):
    """configs/best.yaml validates the moving average of the weights (EMAWeightAveraging, and
    the mirrored images): the training images are evaluated with those weights too, not the
    raw ones being trained, whose running accuracy reads as overfitting."""
    main(
        fit_args(
            data_dir,
            tmp_path,
            f"--config={ROOT / 'configs' / 'best.yaml'}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=48",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=1",
        )
    )
    run = tmp_path / "lightning_logs" / "sgd+best_0"
    events = _events(run)
    (logged,) = _values(events, "train_eval/acc")
    (best,) = (run / "checkpoints").glob("epoch01-*.ckpt")  # the average, as validated
    model = ImageClassifier(dropout=0.021, flip_tta=True)
    model.load_state_dict(torch.load(best, weights_only=True)["state_dict"])
    data = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=128)
    data.setup("fit")
    images, labels = data.train_set.images[:2000], data.train_set.labels[:2000]  # val's number
    with torch.no_grad():
        predicted = model.eval()(images).argmax(dim=1)  # uint8, as the loaders give them
    assert logged == pytest.approx((predicted == labels).float().mean().item(), abs=1e-6)
    (running,) = _values(events, "train/acc")  # the raw weights, during the epoch
    assert running - logged > 0.1


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
    events = _events(tmp_path / "lightning_logs" / "sgd_0")
    assert events.Tags()["images"] == []
    assert "val/acc" in events.Tags()["scalars"]


def test_wrong_predictions_are_framed_red_and_right_ones_not():
    images = torch.zeros(2, 1, 28, 28)
    grid = render_predictions(
        images,
        predicted=torch.tensor([3, 5]),
        target=torch.tensor([3, 4]),
        probability=torch.tensor([0.9, 0.6]),
    )
    picture = grid.permute(1, 2, 0).numpy()
    tile_width = picture.shape[1] // 4
    red = (picture == WRONG).all(axis=-1)
    assert not red[:, :tile_width].any()  # the right one: no red frame, green caption
    r, g, b = (picture[:, :tile_width, i].astype(int) for i in range(3))
    assert ((g > 150) & (r < 130) & (b < 130)).sum() > 20, RIGHT
    assert red[:, tile_width : 2 * tile_width].sum() > 4 * 56  # a frame around the wrong one
    titled = render_predictions(
        images, torch.tensor([3, 5]), torch.tensor([3, 4]), torch.tensor([0.9, 0.6]), title="e 2"
    )
    assert titled.shape[1] == grid.shape[1] + 20  # a strip above for the epoch
    assert (titled[:, :20] > 200).any() and torch.equal(titled[:, 20:], grid)


def test_confusion_matrix_rows_are_shares_and_never_predicted_classes_are_red():
    matrix = torch.zeros(10, 10, dtype=torch.long)
    matrix[0, 0], matrix[5, 7], matrix[7, 7] = 100, 500, 3  # only T-shirt and Sneaker predicted
    picture = render_confusion_matrix(matrix, "val").permute(1, 2, 0).numpy()

    def cell(row, column):  # a corner of the cell, away from its number
        return tuple(picture[TOP + row * CELL_H + 2, LEFT + column * CELL_W + 2])

    assert cell(5, 7) == share_colour(1.0)  # 500 of 500, as dark as 100 of 100 on the diagonal
    assert cell(7, 7) == share_colour(1.0)
    assert cell(5, 5) == share_colour(0.0)

    def red(area):
        r, g, b = (area[..., i].astype(int) for i in range(3))
        return ((r > 180) & (g < 150) & (b < 150)).sum()

    sandal, sneaker = LEFT + 5 * CELL_W, LEFT + 7 * CELL_W
    assert red(picture[20 : TOP - 4, sandal : sandal + CELL_W]) > 20  # never predicted: red
    assert red(picture[20 : TOP - 4, sneaker : sneaker + CELL_W]) == 0


def test_confusion_matrix_numbers_are_legible_at_card_size():
    """Each cell's percentage in type large enough for a card that shows the picture at 300 px
    (its rows hold 10 cells), light on dark cells and dark on light ones."""
    matrix = torch.full((10, 10), 1, dtype=torch.long) + torch.diag(torch.full((10,), 991))
    picture = render_confusion_matrix(matrix, "val").permute(1, 2, 0).numpy().astype(int)
    scale = 300 / picture.shape[1]
    inside = slice(TOP + 2, TOP + CELL_H - 3)  # the first row's cells, without their borders
    diagonal = picture[inside, LEFT + 2 : LEFT + CELL_W - 3]  # "99", white on blue
    ink = (diagonal.min(axis=2) > 200).any(axis=1)  # rows of the cell with white type
    assert ink.sum() * scale >= 7, ink.sum()  # the digits' height at card size, in pixels
    other = picture[inside, LEFT + CELL_W + 2 : LEFT + 2 * CELL_W - 3]  # "<1", dark on white
    assert (other.max(axis=2) < 80).any(axis=1).sum() * scale >= 7


@pytest.mark.slow
def test_make_tensorboard_prints_the_projects_views_last_and_serves_them(trained_run):
    """The last lines are the links (TensorBoard's bare address opens Time Series smoothed and
    a colour a run), and the server they point to serves the runs and the project's layout."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "fashion_lightning.board", "--logdir", str(trained_run.parent)]
    board = subprocess.Popen(
        [*command, "--port", str(port), "--host", "127.0.0.1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        printed = [board.stdout.readline() for _ in range(5)]
        url = f"http://127.0.0.1:{port}/"
        assert printed[0].startswith(f"TensorBoard over {trained_run.parent} at {url}")
        assert printed[1].strip() == f"{url}#custom_scalars&_smoothingWeight=0"
        assert printed[3].strip().startswith(f"{url}?smoothing=0&runColorGroup=regex:")
        with urllib.request.urlopen(f"{url}data/runs", timeout=30) as response:
            assert json.loads(response.read()) == ["sgd_0"]
        with urllib.request.urlopen(f"{url}data/plugin/custom_scalars/layout", timeout=30) as r:
            categories = [c["title"] for c in json.loads(r.read())["category"]]
        assert categories[0].startswith("Does it overfit?")
    finally:
        board.terminate()
        board.wait(timeout=30)
