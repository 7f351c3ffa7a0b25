"""What TensorBoard shows beyond curves: hyperparameters, prediction grids, confusion matrices."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from torchmetrics.classification import MulticlassConfusionMatrix

from fashion_lightning.data import CLASS_NAMES

HP_METRIC = "hp_metric"
RIGHT, WRONG = (90, 200, 90), (235, 70, 70)


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    logger = trainer.logger
    return logger if isinstance(logger, TensorBoardLogger) else None


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``, with values TensorBoard's HParams tab accepts."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class HParamsSummary(Callback):
    """Writes each run's hyperparameters to TensorBoard's HParams tab, with ``hp_metric``
    updated to the best ``val/acc`` so far after every validation, so runs compare in one table.

    Lightning's own entry holds only the model's and data's arguments and sets ``hp_metric``
    to -1; TensorBoard keeps the first entry of a run, so this callback writes the only one.
    """

    def __init__(self) -> None:
        self.best = float("nan")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _tensorboard(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        params = {
            "model": dict(pl_module.hparams_initial),
            "data": dict(trainer.datamodule.hparams_initial) if trainer.datamodule else {},
            "trainer": {
                "max_epochs": trainer.max_epochs,
                "seed_everything": os.environ.get("PL_GLOBAL_SEED", "none"),
                "devices": trainer.world_size,
                "precision": trainer.precision,
            },
        }
        params["model"].pop("_instantiator", None)
        params["data"].pop("_instantiator", None)
        logger.log_hyperparams(params, metrics={})  # hparams.yaml only: no -1 placeholder
        flat = flatten(params)
        writer = logger.experiment._get_file_writer()
        for summary in hparams_summaries(flat, {HP_METRIC: 0}):  # metric names, not values
            writer.add_summary(summary)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        accuracy = trainer.callback_metrics.get("val/acc")
        if trainer.sanity_checking or accuracy is None:
            return
        accuracy = float(accuracy)
        if not accuracy <= self.best:  # also replaces the initial NaN
            self.best = accuracy
        if trainer.logger is not None:
            trainer.logger.log_metrics({HP_METRIC: self.best}, step=trainer.global_step)

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.best = state_dict["best"]


def _chw(canvas: Image.Image) -> Tensor:
    """An RGB picture as the CHW uint8 tensor that ``SummaryWriter.add_image`` takes."""
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_predictions(
    images: Tensor, predicted: Tensor, target: Tensor, columns: int = 8
) -> Tensor:
    """A grid of images, each captioned with predicted and true class; wrong ones framed red.

    Returns a CHW uint8 tensor for ``SummaryWriter.add_image``.
    """
    scale, pad, caption = 3, 6, 30
    tile_w, tile_h = 28 * scale + 2 * pad + 40, 28 * scale + 2 * pad + caption
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * tile_w, rows * tile_h), (20, 20, 20))
    draw, font = ImageDraw.Draw(canvas), _font(11)
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).to(torch.uint8)
    for i, (image, guess, truth) in enumerate(
        zip(pixels, predicted.tolist(), target.tolist(), strict=True)
    ):
        x, y = (i % columns) * tile_w, (i // columns) * tile_h
        left = x + (tile_w - 28 * scale) // 2
        picture = Image.fromarray(image.reshape(28, 28).numpy(), "L").resize(
            (28 * scale, 28 * scale), Image.NEAREST
        )
        canvas.paste(picture, (left, y + pad))
        color = RIGHT if guess == truth else WRONG
        if guess != truth:
            draw.rectangle(
                (left - 3, y + pad - 3, left + 28 * scale + 2, y + pad + 28 * scale + 2),
                outline=WRONG,
                width=3,
            )
        text_y = y + pad + 28 * scale + 3
        draw.text((x + 4, text_y), f"pred {CLASS_NAMES[guess]}", fill=color, font=font)
        draw.text(
            (x + 4, text_y + 13), f"true {CLASS_NAMES[truth]}", fill=(220, 220, 220), font=font
        )
    return _chw(canvas)


def render_confusion_matrix(matrix: Tensor, title: str) -> Tensor:
    """The confusion matrix as a labelled heat map (rows: true class, columns: predicted).

    Drawn with Pillow, which torchvision already needs: a matplotlib figure would cost a
    noticeable part of an epoch for each validation.
    """
    counts = matrix.detach().cpu().long()
    cell, left, top = 46, 96, 110
    size = (left + cell * len(counts) + 10, top + cell * len(counts) + 10)
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), _font(11)
    draw.text((6, 4), title, fill=(0, 0, 0), font=_font(13))
    draw.text((6, top - 16), "true \\ predicted", fill=(90, 90, 90), font=font)
    row_totals = counts.sum(dim=1).clamp(min=1)
    for i, name in enumerate(CLASS_NAMES):
        draw.text((6, top + i * cell + cell // 2 - 6), name, fill=(0, 0, 0), font=font)
        label = Image.new("RGB", (top - 24, 14), (255, 255, 255))
        ImageDraw.Draw(label).text((0, 0), name, fill=(0, 0, 0), font=font)
        label = label.rotate(90, expand=True)
        canvas.paste(label, (left + i * cell + cell // 2 - 7, 22))
        for j in range(len(counts)):
            share = float(counts[i, j]) / float(row_totals[i])
            shade = int(255 * (1 - share))
            fill = (shade, shade, 255) if i != j else (shade, 255 - (255 - shade) // 3, shade)
            box = (
                left + j * cell,
                top + i * cell,
                left + (j + 1) * cell - 1,
                top + (i + 1) * cell - 1,
            )
            draw.rectangle(box, fill=fill, outline=(225, 225, 225))
            text_color = (255, 255, 255) if share > 0.55 else (0, 0, 0)
            draw.text(
                (box[0] + 5, box[1] + cell // 2 - 6),
                str(int(counts[i, j])),
                fill=text_color,
                font=font,
            )
    return _chw(canvas)


class ClassificationImages(Callback):
    """TensorBoard images: each validation epoch a grid of validation images with predicted
    and true classes (wrong ones framed red) and the confusion matrix; the test confusion
    matrix at the end of testing."""

    def __init__(self, every_n_epochs: NonNegativeInt = 1, num_images: PositiveInt = 32) -> None:
        """
        Args:
            every_n_epochs: Draw the validation images every this many epochs; 0 switches
                the images off (the test confusion matrix too).
            num_images: How many validation images the grid shows (the first ones of the
                validation set, so the same images are watched across epochs).
        """
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.confusion = MulticlassConfusionMatrix(len(CLASS_NAMES))
        self.samples: tuple[Tensor, Tensor, Tensor] | None = None

    def _active(self, trainer: L.Trainer) -> bool:
        if self.every_n_epochs <= 0 or trainer.sanity_checking:
            return False
        return trainer.testing or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _start(self, pl_module: L.LightningModule) -> None:
        self.confusion = self.confusion.to(pl_module.device)
        self.confusion.reset()
        self.samples = None

    def _update(self, trainer, outputs: Tensor, batch, batch_idx: int) -> None:
        if not self._active(trainer) or outputs is None:
            return
        images, labels = batch
        predicted = outputs.argmax(dim=1)
        self.confusion.update(predicted, labels)
        if batch_idx == 0:
            keep = slice(0, self.num_images)
            self.samples = (images[keep].cpu(), predicted[keep].cpu(), labels[keep].cpu())

    def _finish(self, trainer: L.Trainer, stage: str) -> None:
        if not self._active(trainer):
            return
        matrix = self.confusion.compute()  # every rank takes part: it syncs under DDP
        logger = _tensorboard(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        step = trainer.global_step
        epoch = f", epoch {trainer.current_epoch}" if stage == "val" else ""
        title = f"{stage} confusion matrix{epoch} (rows: true, columns: predicted)"
        logger.experiment.add_image(
            f"{stage}/confusion_matrix", render_confusion_matrix(matrix, title), step
        )
        if stage == "val" and self.samples is not None:
            logger.experiment.add_image("val/predictions", render_predictions(*self.samples), step)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self._update(trainer, outputs, batch, batch_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, "val")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update(trainer, outputs, batch, batch_idx)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, "test")
