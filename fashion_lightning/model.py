"""The tutorial's network and the LightningModule that trains it."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from fashion_lightning.data import CLASS_NAMES, IMAGE_SIZE
from fashion_lightning.errors import NonFiniteLossError

NUM_CLASSES = len(CLASS_NAMES)


class MLP(nn.Module):
    """The tutorial's ``NeuralNetwork``: Flatten -> 784-512-512-10 with ReLU, raw logits out.

    Module names match the tutorial, so its ``state_dict`` loads unchanged.
    """

    def __init__(self, hidden_size: int = 512) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_relu_stack(self.flatten(x))


class ImageClassifier(L.LightningModule):
    """Trains :class:`MLP` with cross-entropy; logs loss and accuracy per stage."""

    def __init__(
        self,
        hidden_size: int = 512,
        optimizer: OptimizerCallable = torch.optim.SGD,
    ) -> None:
        """
        Args:
            hidden_size: Width of the MLP's two hidden layers (the tutorial: 512).
            optimizer: Optimizer class and its arguments, e.g. ``torch.optim.SGD`` with
                ``lr: 1e-3`` (the tutorial; also torch's default lr for SGD).
        """
        super().__init__()
        self.save_hyperparameters()
        self.optimizer = optimizer
        self.model = MLP(hidden_size)
        self.val_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.test_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        if not torch.isfinite(loss):
            self._stop_on_non_finite(loss, batch_idx)
        self.log("train/loss", loss, batch_size=len(labels))
        return loss

    def _stop_on_non_finite(self, loss: Tensor, batch_idx: int) -> None:
        """Stop before a NaN/inf loss is back-propagated into the weights."""
        checkpoint = self.trainer.checkpoint_callback
        kept = checkpoint.last_model_path if checkpoint is not None else ""
        kept = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"training loss became {loss.item()} at step {self.global_step} "
            f"(epoch {self.current_epoch}, batch {batch_idx}); {kept}. "
            "Lower the learning rate (--model.optimizer.init_args.lr)"
        )

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy):
        images, labels = batch
        logits = self(images)
        accuracy.update(logits, labels)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), batch_size=len(labels))
        self.log(f"{stage}/acc", accuracy, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Predicted class index and its softmax probability for each image."""
        images, _ = batch
        probability, label = self(images).softmax(dim=-1).max(dim=-1)
        return {"label": label, "probability": probability}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.parameters())
