"""The tutorial's network, and the sizes its arguments may take."""

from __future__ import annotations

from jsonargparse.typing import restricted_number_type
from torch import Tensor, nn

from fashion_lightning.fashion_mnist import IMAGE_SIZE, NUM_CLASSES

# the hidden layers' width: 16384 makes a 1 GB layer, far past what 28x28 images need
HiddenSize = restricted_number_type(
    "HiddenSize", int, [(">=", 1), ("<=", 16384)], docstring="an int in [1, 16384]"
)
# a dropout probability: 0 (none) up to, not including, 1 (which would drop everything)
DropoutProbability = restricted_number_type(
    "DropoutProbability", float, [(">=", 0), ("<", 1)], docstring="a float in [0, 1)"
)


class MLP(nn.Module):
    """The tutorial's ``NeuralNetwork``: Flatten -> 784-512-512-10 with ReLU, raw logits out.

    Module names match the tutorial, so its ``state_dict`` loads unchanged. ``dropout`` > 0
    adds a Dropout after each ReLU (and so shifts the layer numbers).
    """

    def __init__(self, hidden_size: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        regularize = [nn.Dropout(dropout)] if dropout > 0 else []
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, hidden_size),
            nn.ReLU(),
            *regularize,
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            *regularize,
            nn.Linear(hidden_size, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_relu_stack(self.flatten(x))
