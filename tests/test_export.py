"""Exported models (ONNX, ``torch.export``, TorchScript) take images as the loaders give them
and give the model's logits. (A trained checkpoint's exports: tests/test_predict.py.)"""

from __future__ import annotations

import torch

from fashion_lightning.model import ImageClassifier
from tests.helpers import exports


def test_exports_take_raw_images_and_give_the_models_logits(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(standardize=True, flip_tta=True).eval()
    images = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)  # any batch size
    with torch.no_grad():
        expected = model(images)
        for name, export in exports(model, tmp_path).items():
            torch.testing.assert_close(export(images), expected, rtol=0, atol=1e-5, msg=name)
