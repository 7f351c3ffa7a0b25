"""The network is the tutorial's, and the LightningModule trains and predicts with it."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.functional import to_tensor

from fashion_lightning.model import ImageClassifier
from fashion_lightning.network import MLP


class TutorialNeuralNetwork(nn.Module):
    """Verbatim from the tutorial (``optimization_tutorial.md``)."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


def test_tutorial_state_dict_loads_unchanged_and_gives_the_same_logits():
    torch.manual_seed(0)
    tutorial = TutorialNeuralNetwork()
    mlp = MLP()
    mlp.load_state_dict(tutorial.state_dict())  # strict: same names and shapes
    images = torch.rand(8, 1, 28, 28)
    assert torch.equal(mlp(images), tutorial(images))


def test_logits_are_raw_not_passed_through_relu():
    torch.manual_seed(0)
    logits = MLP()(torch.rand(256, 1, 28, 28))
    assert logits.shape == (256, 10)
    assert (logits < 0).any()


def test_default_optimizer_is_the_tutorials_sgd():
    optimizer = ImageClassifier().configure_optimizers()
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["momentum"] == 0


def test_predict_step_gives_class_index_and_its_probability():
    model = ImageClassifier()
    images = torch.rand(5, 1, 28, 28)
    out = model.predict_step((images, torch.zeros(5, dtype=torch.long)), 0)
    probabilities = model(images).softmax(-1)
    assert torch.equal(out["label"], probabilities.argmax(-1))
    assert torch.allclose(out["probability"], probabilities.max(-1).values)


def test_standardize_and_flip_tta_change_what_the_network_sees_and_nothing_else():
    torch.manual_seed(0)
    plain = ImageClassifier()
    tuned = ImageClassifier(standardize=True, flip_tta=True)
    tuned.load_state_dict(plain.state_dict())  # no new weights: the same checkpoints load
    images = torch.rand(4, 1, 28, 28)
    standardized = (images - 0.2860) / 0.3530
    assert torch.allclose(tuned._network(images), plain(standardized))  # what training sees
    both = (plain(standardized) + plain(standardized.flip(-1))) / 2
    assert torch.allclose(tuned(images), both)  # what evaluation and predictions see
    out = tuned.predict_step((images, torch.zeros(4, dtype=torch.long)), 0)
    assert torch.equal(out["label"], both.argmax(-1))
    assert torch.equal(plain._network(images), plain(images))  # off by default: the tutorial


def test_the_model_takes_images_as_the_loaders_give_them_or_as_totensor_floats():
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    as_totensor = torch.stack([to_tensor(Image.fromarray(p[0].numpy())) for p in pixels])
    for model in (ImageClassifier(), ImageClassifier(standardize=True, flip_tta=True)):
        assert torch.equal(model(pixels), model(as_totensor))  # bit for bit
