"""predict: a CSV over the test split, and your own pictures."""

from __future__ import annotations

import csv
import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.datasets import FashionMNIST

from fashion_lightning.cli import main
from fashion_lightning.data import FashionMNISTDataModule
from fashion_lightning.model import ImageClassifier
from fashion_lightning.pictures import to_fashion_mnist
from tests.helpers import exports, fit_args

pytestmark = pytest.mark.slow


def _predict(data_dir, root, checkpoint, *extra) -> list[dict[str, str]]:
    main(["predict", *fit_args(data_dir, root)[1:], f"--ckpt_path={checkpoint}", *extra])
    with (root / "lightning_logs" / "sgd_0" / "predictions.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def test_split_rows(trained_run, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return _predict(data_dir, root, trained_run / "checkpoints" / "last.ckpt")


def test_csv_over_the_test_split_agrees_with_test_acc(
    test_split_rows, trained_run, data_dir, tmp_path, capsys
):
    rows = test_split_rows
    assert len(rows) == 10000
    assert [int(row["index"]) for row in rows] == list(range(10000))
    truth = FashionMNIST(str(data_dir), train=False).targets.tolist()
    assert [int(row["true_label"]) for row in rows] == truth
    assert all(0.1 <= float(row["probability"]) <= 1 for row in rows)
    assert {row["class_name"] for row in rows if row["predicted_label"] == "7"} == {"Sneaker"}
    accuracy = sum(row["true_label"] == row["predicted_label"] for row in rows) / len(rows)

    main(
        [
            "test",
            *fit_args(data_dir, tmp_path)[1:],
            f"--ckpt_path={trained_run}/checkpoints/last.ckpt",
        ]
    )
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "sgd_0"))
    events.Reload()
    assert events.Scalars("test/acc")[-1].value == pytest.approx(accuracy, abs=1e-6)


def test_own_pictures_are_classified_and_broken_files_skipped(
    test_split_rows, trained_run, data_dir, tmp_path, capsys
):
    test_set = FashionMNIST(str(data_dir), train=False)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    test_set[0][0].save(pictures / "a_test_image_0.png")  # 28x28, as in the test split
    ImageOps.invert(test_set[1][0]).resize((140, 140)).save(pictures / "b_photo.jpg", quality=90)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(pictures / "c.png")
    (pictures / "d_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (pictures / "e_notes.txt").write_text("not a picture")
    (pictures / "f_link.png").symlink_to(pictures / "gone.png")

    rows = _predict(
        data_dir,
        tmp_path,
        trained_run / "checkpoints" / "last.ckpt",
        f"--data.predict_dir={pictures}",
    )
    assert [row["file"] for row in rows] == ["a_test_image_0.png", "b_photo.jpg", "c.png"]
    assert rows[0]["predicted_label"] == test_split_rows[0]["predicted_label"]
    assert float(rows[0]["probability"]) == pytest.approx(
        float(test_split_rows[0]["probability"]), abs=1e-5
    )
    err = capsys.readouterr().err
    assert "skipped d_broken.png: " in err and "skipped e_notes.txt: not an image" in err
    assert "skipped f_link.png: not a file (a pipe, a device, a broken link)" in err


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few bytes (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + end


def test_odd_files_and_names_are_skipped_or_kept_harmless(trained_run, data_dir, tmp_path, capsys):
    test_set = FashionMNIST(str(data_dir), train=False)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for name in ("=HYPERLINK(1).png", "+1.png", "-1.png", "@SUM(1).png"):
        test_set[0][0].save(pictures / name)
    test_set[0][0].save(os.fsdecode(bytes(pictures) + b"/\xff\xfe.png"))  # not UTF-8
    (pictures / "bomb.png").write_bytes(_png_header_only(30000, 30000))
    (pictures / "more").mkdir()
    test_set[1][0].save(pictures / "more" / "inside.png")

    rows = _predict(
        data_dir,
        tmp_path,
        trained_run / "checkpoints" / "last.ckpt",
        f"--data.predict_dir={pictures}",
    )
    # a spreadsheet would run a cell that begins with = + - @ as a formula (OWASP)
    assert sorted(row["file"] for row in rows) == [
        "'+1.png",
        "'-1.png",
        "'=HYPERLINK(1).png",
        "'@SUM(1).png",
        "\\xff\\xfe.png",
    ]
    err = capsys.readouterr().err
    assert "skipped bomb.png: too many pixels" in err
    assert "skipped more/: a folder (pictures in subfolders are not read)" in err


def test_a_dark_on_light_photo_becomes_a_fashion_mnist_image(data_dir):
    original = FashionMNIST(str(data_dir), train=False)[9][0]  # a sneaker as wide as the image
    photo = ImageOps.invert(original).resize((280, 280), Image.NEAREST)
    image = to_fashion_mnist(photo)
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    # inverted back (dark background), and scaled back to the original's extent
    difference = (image.float() - torch.from_numpy(np.array(original)).float()).abs().mean()
    assert difference < 8  # of 255: resampling only


@pytest.mark.parametrize(
    ("folder", "problem"),
    [
        ("only-broken", "no readable picture (1 files skipped); put PNG or JPEG files there"),
        ("only-truncated", "no readable picture (1 files skipped); put PNG or JPEG files there"),
        ("nowhere", "no such folder"),
        ("a-file.png", "a file; pass the folder that holds it"),
    ],
)
def test_a_folder_without_pictures_is_one_line_and_leaves_no_run_folder(
    folder, problem, trained_run, data_dir, tmp_path, capsys
):
    pictures = tmp_path / folder
    if folder.startswith("only"):
        pictures.mkdir()
        png = io.BytesIO()
        Image.new("L", (64, 64), 128).save(png, "PNG")
        bad = b"nope" if folder == "only-broken" else png.getvalue()[:60]  # a good header only
        (pictures / "bad.png").write_bytes(bad)
    elif folder == "a-file.png":
        Image.new("L", (28, 28)).save(pictures)
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "predict",
                *fit_args(data_dir, tmp_path / "runs")[1:],
                f"--ckpt_path={trained_run}/checkpoints/last.ckpt",
                f"--data.predict_dir={pictures}",
            ]
        )
    assert exit_.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: --data.predict_dir {pictures}: {problem}"
    assert not list((tmp_path / "runs").glob("lightning_logs/*"))  # no run folder was left


def test_a_dark_garment_on_a_transparent_background_is_filled_white_then_inverted(data_dir):
    original = FashionMNIST(str(data_dir), train=False)[1][0]  # a light pullover on black
    garment = np.array(original)
    # what a cut-out photo of a dark pullover looks like: the rest transparent (and black)
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., :3] = np.where(garment[..., None] > 0, 255 - garment[..., None], 0)
    rgba[..., 3] = np.where(garment > 0, 255, 0)
    image = to_fashion_mnist(Image.fromarray(rgba, "RGBA"))
    assert torch.equal(image[0], torch.from_numpy(garment))  # light on dark again, exactly


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_16_bit_and_float_pictures_are_scaled_not_clipped(mode, data_dir):
    original = FashionMNIST(str(data_dir), train=False)[1][0]  # 8-bit, light on dark
    pixels = np.array(original, dtype=np.float64)
    scaled = pixels / 255 if mode == "F" else pixels * 257  # 255 -> 65535
    picture = Image.fromarray(
        scaled.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    )
    assert picture.mode == ("I;16" if mode == "I;16" else mode)
    assert torch.equal(to_fashion_mnist(picture)[0], torch.from_numpy(np.array(original)))


def test_a_checkpoint_in_a_notebook_and_its_exports_give_its_predictions(
    test_split_rows, trained_run, data_dir, tmp_path
):
    model = ImageClassifier.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    model.eval()
    data = FashionMNISTDataModule(data_dir=str(data_dir))
    data.setup("test")
    images = torch.cat([images for images, _ in data.test_dataloader()])
    assert images.dtype == torch.uint8  # as the loaders give them
    # what `predict --ckpt_path` wrote for the same checkpoint
    labels = np.array([int(row["predicted_label"]) for row in test_split_rows])
    probability = np.array([float(row["probability"]) for row in test_split_rows])
    with torch.no_grad():
        logits = model(images)
        assert torch.equal(model(images.float() / 255), logits)  # floats as ToTensor gives
        assert (logits.argmax(-1).numpy() == labels).all()
        for name, export in exports(model, tmp_path).items():
            exported = export(images)
            assert (exported.argmax(-1).numpy() == labels).all(), name
            top = exported.softmax(-1).max(-1).values.numpy()
            np.testing.assert_allclose(top, probability, rtol=0, atol=2e-6, err_msg=name)
