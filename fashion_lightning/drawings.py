"""How the pictures TensorBoard shows are drawn: prediction grids and confusion matrices,
readable at the size of TensorBoard's cards (about 400 px). Drawn with Pillow: a matplotlib
figure costs a noticeable part of an epoch."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from fashion_lightning.fashion_mnist import CLASS_NAMES

RIGHT, WRONG = (90, 200, 90), (235, 70, 70)


def _chw(canvas: Image.Image) -> Tensor:
    """An RGB picture as the CHW uint8 tensor that ``SummaryWriter.add_image`` takes."""
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_predictions(
    images: Tensor,
    predicted: Tensor,
    target: Tensor,
    probability: Tensor,
    columns: int = 4,
    title: str = "",
) -> Tensor:
    """A grid of images, each captioned with the predicted class and its probability and the
    true class; wrong ones framed red; ``title`` above. Drawn for TensorBoard's cards (about
    400 px wide).

    Returns a CHW uint8 tensor for ``SummaryWriter.add_image``.
    """
    scale, pad, caption = 2, 6, 28
    side = 28 * scale
    tile_w, tile_h = 100, side + 2 * pad + caption
    rows = (len(images) + columns - 1) // columns
    top = 20 if title else 0
    canvas = Image.new("RGB", (columns * tile_w, top + rows * tile_h), (20, 20, 20))
    draw, font = ImageDraw.Draw(canvas), _font(12)
    if title:
        draw.text((4, 4), title, fill=(235, 235, 235), font=font)
    pixels = images.detach().cpu()  # uint8 as the loaders give them, or floats in [0, 1]
    if pixels.is_floating_point():
        pixels = (pixels.float().clamp(0, 1) * 255).to(torch.uint8)
    for i, (image, guess, truth, p) in enumerate(
        zip(pixels, predicted.tolist(), target.tolist(), probability.tolist(), strict=True)
    ):
        x, y = (i % columns) * tile_w, top + (i // columns) * tile_h
        left = x + (tile_w - side) // 2
        picture = Image.fromarray(image.reshape(28, 28).numpy(), "L").resize(
            (side, side), Image.NEAREST
        )
        canvas.paste(picture, (left, y + pad))
        if guess != truth:
            frame = (left - 3, y + pad - 3, left + side + 2, y + pad + side + 2)
            draw.rectangle(frame, outline=WRONG, width=3)
        text_y = y + pad + side + 3
        color = RIGHT if guess == truth else WRONG
        draw.text((x + 4, text_y), f"{CLASS_NAMES[guess][:11]} {p:.0%}", fill=color, font=font)
        if guess != truth:
            draw.text(
                (x + 4, text_y + 13),
                f"is {CLASS_NAMES[truth][:11]}",
                fill=(220, 220, 220),
                font=font,
            )
    return _chw(canvas)


def share_colour(share: float) -> tuple[int, int, int]:
    """White (0%) to dark blue (100%)."""
    return (
        int(255 - 215 * share),
        int(255 - 175 * share),
        int(255 - 75 * share),
    )


# the confusion matrix's geometry: cells, the class names' column on the left and row, the
# images-a-class column on the right
CELL_W, CELL_H, LEFT, TOP, COUNTS_W = 30, 28, 70, 92, 40


def _share_text(share: float) -> str:
    """A cell's percentage, whole: "93"; "<1" and ">99" for shares that would round to 0 or
    100 but are not (the row's other cells then hold something)."""
    if 0 < share < 0.005:
        return "<1"
    if 0.995 <= share < 1:
        return ">99"
    return f"{share:.0%}".removesuffix("%")


def render_confusion_matrix(matrix: Tensor, title: str) -> Tensor:
    """The confusion matrix as a heat map with each row normalised to 100% (rows: true class,
    columns: predicted), each cell's percentage in large type, each row's number of images at
    its right, and a colour key; a class the model never predicts has its column name in red.
    Drawn for TensorBoard's cards (about 400 px wide, shown at 300 to 400): the percentages
    stay readable there, where a count in small type beside them blurred. Drawn with Pillow:
    a matplotlib figure costs a noticeable part of an epoch.
    """
    counts = matrix.detach().cpu().long()
    classes = len(counts)
    right = LEFT + CELL_W * classes  # where the images column begins
    canvas = Image.new("RGB", (right + COUNTS_W, TOP + CELL_H * classes + 34), (255, 255, 255))
    draw, font, small, large = ImageDraw.Draw(canvas), _font(11), _font(10), _font(14)
    grey = (90, 90, 90)
    draw.text((4, 3), title, fill=(0, 0, 0), font=_font(12))
    draw.text((4, TOP - 14), "true \\ predicted", fill=grey, font=small)
    draw.text((right + 4, TOP - 14), "images", fill=grey, font=small)
    totals = counts.sum(dim=1)
    shares = counts.float() / totals.unsqueeze(1).clamp(min=1)
    never_predicted = counts.sum(dim=0) == 0
    for i, name in enumerate(CLASS_NAMES):
        short = name.split("/")[0]
        row_y = TOP + i * CELL_H
        draw.text((4, row_y + CELL_H // 2 - 6), short, fill=(0, 0, 0), font=font)
        draw.text((right + 4, row_y + CELL_H // 2 - 6), str(int(totals[i])), fill=grey, font=font)
        label = Image.new("RGB", (TOP - 24, 13), (255, 255, 255))
        red = bool(never_predicted[i])
        ImageDraw.Draw(label).text((0, 0), short, fill=WRONG if red else (0, 0, 0), font=font)
        canvas.paste(label.rotate(90, expand=True), (LEFT + i * CELL_W + CELL_W // 2 - 6, 20))
        for j in range(classes):
            share = float(shares[i, j])
            box = (
                LEFT + j * CELL_W,
                row_y,
                LEFT + (j + 1) * CELL_W - 1,
                row_y + CELL_H - 1,
            )
            draw.rectangle(box, fill=share_colour(share), outline=(230, 230, 230))
            if counts[i, j] == 0:
                continue
            ink = (255, 255, 255) if share > 0.5 else (0, 0, 0)
            middle = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            draw.text(middle, _share_text(share), fill=ink, font=large, anchor="mm")
    key_y = TOP + CELL_H * classes + 10
    for x in range(CELL_W * 5):  # the colour key: 0% to 100% of the true class
        draw.line((LEFT + x, key_y, LEFT + x, key_y + 10), fill=share_colour(x / (CELL_W * 5 - 1)))
    draw.text((4, key_y), "% of row", fill=grey, font=small)
    draw.text((LEFT + CELL_W * 5 + 4, key_y), "0 to 100", fill=grey, font=small)
    return _chw(canvas)
