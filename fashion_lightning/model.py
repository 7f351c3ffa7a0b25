"""The LightningModule that trains the tutorial's network (:mod:`.network`)."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from fashion_lightning.checkpoints import CROSS_ENTROPY_KEY
from fashion_lightning.errors import NonFiniteLossError
from fashion_lightning.fashion_mnist import (
    CLASS_TAGS,
    IMAGE_SIZE,
    NUM_CLASSES,
    PIXEL_MEAN,
    PIXEL_STD,
    to_float_images,
)
from fashion_lightning.network import MLP, DropoutProbability, HiddenSize
from fashion_lightning.run_checkpoints import run_checkpoint
from fashion_lightning.run_records import TRAIN_EVAL
from fashion_lightning.schedules import (
    check_schedule_length,
    configure_optimizers,
    plateau_monitor,
    step_at_epoch_end,
)
from fashion_lightning.steps import LOOP_KEY, optimizer_step_done

# how a value computed from synced metrics is logged: it is the same on every process, so
# Lightning's sync (whose absence it warns about under DDP) takes the max of equal numbers,
# exactly that number (a mean of three equal floats can round)
SAME_ON_EVERY_PROCESS = {"sync_dist": True, "reduce_fx": "max"}


class ImageClassifier(L.LightningModule):
    """Trains :class:`MLP` with cross-entropy; logs loss and accuracy per stage.

    (Longer than the project's other classes: a LightningModule's hooks for training,
    validation, test and predict are its methods, and ``__init__`` documents every argument,
    which becomes the CLI's ``--help``.)"""

    def __init__(
        self,
        hidden_size: HiddenSize = 512,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "epoch",
        scheduler_monitor: str = "val/loss",
        dropout: DropoutProbability = 0.0,
        label_smoothing: ClosedUnitInterval = 0.0,
        compile: bool = False,
        standardize: bool = False,
        flip_tta: bool = False,
        steps_per_call: PositiveInt = 1,
    ) -> None:
        """
        Args:
            hidden_size: Width of the MLP's two hidden layers (the tutorial: 512), up to 16384.
            optimizer: Optimizer class and its arguments, e.g. ``torch.optim.SGD`` with
                ``lr: 1e-3`` (the tutorial; also torch's default lr for SGD). Weight decay is
                an optimizer argument (``weight_decay``).
            lr_scheduler: Learning-rate scheduler class and its arguments (none: constant).
                ``OneCycleLR`` without ``total_steps`` spans the whole run.
            scheduler_interval: Step the scheduler after every optimizer ``step`` or every
                ``epoch``.
            scheduler_monitor: The metric a plateau scheduler (``ReduceLROnPlateau``) follows:
                it steps at the end of each epoch that measured it (``val/loss``,
                ``val/acc``... after a validation; ``train/cross_entropy``, ``train/acc`` every
                epoch). Set the scheduler's ``mode`` to ``max`` for an accuracy. Lightning's
                ``lightning.pytorch.cli.ReduceLROnPlateau`` names its own ``monitor``, which
                is used instead.
            dropout: Dropout probability after each hidden ReLU, from 0 (the tutorial: none)
                up to, not including, 1.
            label_smoothing: Label smoothing of the training loss, 0 to 1 (validation and test
                losses stay plain cross-entropy, so that runs compare).
            compile: Compile the network with ``torch.compile`` (needs a C++ compiler on CPU;
                the first steps are slow while it compiles). See the README for its effect.
            standardize: Standardize the input pixels with FashionMNIST's mean and standard
                deviation before the network (the tutorial: no, pixels in [0, 1]). A fixed
                step of the model, so checkpoints and ``predict`` carry it.
            flip_tta: At validation, test and predict (the model's output, exports too),
                average the logits of each image and of its left-right mirror (the tutorial:
                no).
            steps_per_call: Optimizer steps in one call of ``training_step``: the data comes in
                groups of this many consecutive batches of the same order, and each batch is one
                optimizer step, as with 1. The same batches, steps, weights and logged values;
                only Lightning's per-step cost is paid once per group (see docs/speed.md).
        """
        super().__init__()
        # HParamsSummary writes TensorBoard's HParams entry once, with the data and trainer
        # values too; Lightning's own write would come first and hide those
        self.save_hyperparameters(logger=False)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.validated_this_epoch = False  # a plateau scheduler on val/* waits for a validation
        self.resumed_schedules: list[dict[str, Any]] = []  # the schedules' states a run resumes
        self.label_smoothing = label_smoothing
        self.compile = compile
        self.standardize = standardize
        self.flip_tta = flip_tta
        self.steps_per_call = steps_per_call
        # several optimizer steps in one training_step: Lightning's manual optimization
        self.automatic_optimization = steps_per_call == 1
        self.model = MLP(hidden_size, dropout)
        if compile:  # in place (state_dict names stay the tutorial's), when first called; not
            # in configure_model, whose override WeightAveraging warns about (sharding)
            self.model.compile()
        # attributes, not the module's globals: TorchScript (to_torchscript) reads these
        self.pixel_mean, self.pixel_std = PIXEL_MEAN, PIXEL_STD
        # images as the loaders give them, for to_onnx() and torch.export to trace with (two:
        # an export specializes an axis of size 1, and the batch size stays free)
        self.example_input_array = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        # one metric object per stage; torchmetrics also syncs them across DDP processes
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.train_acc.persistent(True)  # in checkpoints, so a mid-epoch resume counts on
        # The epoch's plain cross-entropy of the training batches (no label smoothing), summed
        # over its images: the training loss that compares with val/loss in the learning
        # curves. A sum, not a torchmetrics MeanMetric: its update costs 30 us, 1% of a step,
        # this one addition; kept off the state_dict, so "true" precisions leave it float32.
        self.train_cross_entropy_sum = torch.zeros(())
        self.train_images = 0
        self.epoch_cut_short = False  # max_steps ended the epoch's last group of steps early
        self.val_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.test_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        # accuracy within each true class (its recall): 0 for a class the model never predicts
        self.val_acc_class = MulticlassAccuracy(NUM_CLASSES, average=None)
        self.test_acc_class = MulticlassAccuracy(NUM_CLASSES, average=None)
        # training images measured as validation measures its own, with the same weights, at
        # each validation of fit: a train accuracy and loss that compare with val's
        self.train_eval_loss = MeanMetric()
        self.train_eval_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.train_evaluated = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[LOOP_KEY] = "lightning" if self.automatic_optimization else "project"
        # so that a mid-epoch resume counts on (as train_acc's states, in the state_dict)
        sums = {"sum": float(self.train_cross_entropy_sum), "images": self.train_images}
        checkpoint[CROSS_ENTROPY_KEY] = sums

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a checkpoint from before the sum was kept: the epoch's mean counts the steps after it
        sums = checkpoint.get(CROSS_ENTROPY_KEY) or {"sum": 0.0, "images": 0}
        self.train_cross_entropy_sum = torch.tensor(float(sums["sum"]))
        self.train_images = int(sums["images"])
        self.resumed_schedules = checkpoint.get("lr_schedulers") or []  # checked at fit start

    def forward(self, images: Tensor) -> Tensor:
        """The logits that validation, test and predict use, for a batch of images ``(N, 1,
        28, 28)`` as the loaders give them (uint8 pixels 0-255) or as floats in [0, 1]
        (torchvision's ``ToTensor``): the same logits either way. With ``flip_tta``, the
        average of each image's and its mirror's (a garment mirrored is the same garment).
        Exports (``to_onnx``, ``torch.export``) take the same images and give the same."""
        logits = self._network(images)
        if self.flip_tta:
            logits = (logits + self._network(images.flip(-1))) / 2
        return logits

    def _network(self, images: Tensor) -> Tensor:
        """The MLP's logits (training's, without test-time averaging); the pixels made floats
        here, in the model, so that a checkpoint or an exported model takes raw images."""
        if not images.is_floating_point():
            images = to_float_images(images)
        # the weights' precision: bf16-true and 64-true runs (a no-op in float32)
        images = images.to(self.model.linear_relu_stack[0].weight.dtype)
        if self.standardize:
            images = (images - self.pixel_mean) / self.pixel_std
        return self.model(images)

    def to_onnx(self, file_path: Any, input_sample: Any = None, **kwargs: Any) -> Any:
        """Lightning's ``to_onnx`` with the batch size left free (the first axis of the input
        ``images``, output ``logits``), unless ``kwargs`` say otherwise."""
        if "dynamic_shapes" not in kwargs and "dynamic_axes" not in kwargs:
            kwargs["dynamic_axes"] = {"images": {0: "batch"}, "logits": {0: "batch"}}
        kwargs.setdefault("input_names", ["images"])
        kwargs.setdefault("output_names", ["logits"])
        return super().to_onnx(file_path, input_sample, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """One optimizer step on ``batch`` (Lightning does the step), or, with
        ``steps_per_call`` > 1, one step on each batch of the group ``batch`` holds."""
        if not self.automatic_optimization:
            return self._several_steps(batch if isinstance(batch, list) else [batch], batch_idx)
        images, labels = batch
        loss, logits = self._loss(images, labels, batch_idx)
        self.train_acc.update(logits.detach(), labels)
        self._add_cross_entropy(loss, logits, labels)
        if self._step_is_logged():
            self.log("train/loss", loss, batch_size=len(labels))
            # one tag whatever the optimizer (LearningRateMonitor names it lr-SGD, lr-Adam...)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return {"loss": loss, "images": len(labels)}

    def _loss(self, images: Tensor, labels: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        logits = self._network(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if not torch.isfinite(loss):  # before the step: no NaN reaches the weights
            self._stop_on_non_finite(loss, batch_idx)
        return loss, logits

    def _add_cross_entropy(self, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Count the step's plain cross-entropy: the loss itself unless it is label-smoothed."""
        plain = loss if self.label_smoothing == 0 else F.cross_entropy(logits, labels)
        self.train_cross_entropy_sum.add_(plain.detach().float(), alpha=len(labels))
        self.train_images += len(labels)

    def _several_steps(self, batches: list[tuple[Tensor, Tensor]], call_idx: int) -> dict:
        """The tutorial's loop over a group of batches, one optimizer step each: what Lightning
        does for one batch (zero the gradients, backward, step, the scheduler at ``step``
        interval), the same logging, and what the project does after each step (the weight
        average, step checkpoints, where a resume continues) through
        :func:`~fashion_lightning.resume.optimizer_step_done`."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers() if self.scheduler_interval == "step" else None
        trainer = self.trainer
        images_done, losses = 0, []
        for i, (images, labels) in enumerate(batches):
            if 0 <= trainer.max_steps <= trainer.global_step:
                self.epoch_cut_short = True
                break  # max_steps can end a group early, as it ends an epoch
            step, lr = trainer.global_step, optimizer.param_groups[0]["lr"]
            loss, logits = self._loss(images, labels, call_idx * self.steps_per_call + i)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            self.train_acc.update(logits.detach(), labels)
            self._add_cross_entropy(loss, logits, labels)
            if self._step_is_logged(step):  # at the step and with the values Lightning logs
                for logger in self.loggers:
                    logger.log_metrics({"train/loss": loss.item(), "train/lr": lr}, step=step)
                self.log("train/loss", loss, logger=False)  # for callbacks that monitor it
            images_done += len(labels)
            losses.append(loss.detach())
            optimizer_step_done(trainer, self, len(labels))
        if not losses:  # max_steps came before the group's first step
            return {"images": 0, "losses": None}
        # for callbacks, on the device (no wait): Lightning's "loss", the mean of the call's
        # step losses (with one step a call, that step's loss), and each step's in "losses"
        stacked = torch.stack(losses)
        return {"loss": stacked.mean(), "images": images_done, "losses": stacked}

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.train_acc)
        if self.train_images:  # the mean of each process's mean under DDP (equal shares)
            mean = self.train_cross_entropy_sum / self.train_images
            self.log("train/cross_entropy", mean, sync_dist=True)
        # max_steps can end training within an epoch (or its last group of steps); Lightning
        # still ends the epoch (these hooks, its logs), which has no epoch to be drawn at
        whole = self.trainer.is_last_batch and not self.epoch_cut_short
        self._log_at_optimizer_step(with_epoch=whole)
        if not self.automatic_optimization and self.scheduler_interval == "epoch":
            # Lightning steps schedulers itself only without manual steps; before the epoch's
            # checkpoint, which the monitoring callbacks write after this hook
            step_at_epoch_end(self, self.lr_schedulers())

    def plateau_monitor(self) -> str | None:
        """The metric the learning-rate scheduler follows if it is a plateau scheduler."""
        return plateau_monitor(self.lr_scheduler, self.scheduler_monitor)

    def on_fit_start(self) -> None:
        # before anything runs (a resumed schedule is restored only later)
        check_schedule_length(self, self.trainer, self.resumed_schedules)

    def on_train_start(self) -> None:
        # a sum a checkpoint gave back (on the CPU) goes where the steps add to it
        self.train_cross_entropy_sum = self.train_cross_entropy_sum.to(self.device)

    def on_train_epoch_start(self) -> None:
        # not called when resuming mid-epoch: the counts carry on
        self.validated_this_epoch = False
        self.train_acc.reset()
        self.train_cross_entropy_sum = torch.zeros((), device=self.device)
        self.train_images = 0
        self.epoch_cut_short = False

    def _log_at_optimizer_step(self, with_epoch: bool) -> None:
        """Write this epoch's values at the number of optimizer steps done, where the pictures
        and ``hp_metric`` go too. (Lightning counts its own way: one step behind at the end of
        an epoch, and in calls of ``training_step``, not optimizer steps, with several steps a
        call.) A logged value named ``step`` sets the step of the values logged with it.

        Lightning adds the epoch (``epoch``, counted from 0) to the values it writes only when
        it picks the step itself: it is logged here too with the values of an epoch's end
        (training's, and the validation that ends it), for the loggers (the CSV log's column,
        the TensorBoard charts against epochs).

        Lightning hands every logged value to callbacks too (``trainer.callback_metrics``), and
        offers no value for loggers alone: these two are there while their epoch's end is
        handled, and :meth:`teardown` takes them out when the command's stage ends. A monitor
        (EarlyStopping's, a checkpoint's) is checked against :meth:`monitorable_metrics`
        before training, so a typo's error lists the metrics, not these."""
        # the same on every process: the sync (one tiny collective; the max keeps the number
        # exact) only meets Lightning's advice for epoch values under DDP, printed otherwise
        self.log("step", float(self.global_step), sync_dist=True, reduce_fx="max")
        if with_epoch:
            self.log("epoch", float(self.current_epoch), sync_dist=True, reduce_fx="max")

    def teardown(self, stage: str) -> None:
        # the pseudo-metrics of _log_at_optimizer_step, for the loggers, leave what a notebook
        # or script reads after fit, validate or test (the stage's values are final here)
        for name in ("step", "epoch"):
            self.trainer.callback_metrics.pop(name, None)

    def _step_is_logged(self, step: int | None = None) -> bool:
        """Whether Lightning writes this step's metrics (every ``log_every_n_steps`` steps).

        Each ``self.log`` call costs about 0.5 ms on CPU (Lightning walks its whole result
        object to move it to the value's device), a quarter of this model's training step;
        Lightning writes step values only every ``log_every_n_steps``, so only those are logged.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        every = trainer.log_every_n_steps
        step = trainer.global_step if step is None else step
        # Lightning's rule: it writes a step's values when (its step count + 1) is a multiple
        return every > 0 and (step + 1) % every == 0

    def _stop_on_non_finite(self, loss: Tensor, batch_idx: int) -> None:
        """Stop before a NaN/inf loss is back-propagated into the weights."""
        checkpoint = run_checkpoint(self.trainer)
        kept = checkpoint.last_model_path if checkpoint is not None else ""
        kept = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"training loss became {loss.item()} at step {self.global_step} "
            f"(epoch {self.current_epoch + 1}, batch {batch_idx + 1}); {kept}. "
            "Lower the learning rate (--model.optimizer.init_args.lr)"
        )

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        """Update the stage's metrics (logged once per epoch); the logits go to callbacks."""
        images, labels = batch
        logits = self(images)
        getattr(self, f"{stage}_loss").update(F.cross_entropy(logits, labels), weight=len(labels))
        getattr(self, f"{stage}_acc").update(logits, labels)
        if stage != "train_eval":
            getattr(self, f"{stage}_acc_class").update(logits, labels)
        return logits

    def _log_epoch(self, stage: str) -> None:
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"))
        self.log(f"{stage}/acc", getattr(self, f"{stage}_acc"), prog_bar=True)
        self._log_per_class(stage)
        if stage == "val" and self.train_evaluated:
            self._log_training_images()
        # a validation within an epoch (val_check_interval < 1), or after one that max_steps
        # cut short, has no epoch to be drawn at
        ends_epoch = stage == "val" and self.trainer.is_last_batch and not self.epoch_cut_short
        if ends_epoch and not self.trainer.sanity_checking:
            self.validated_this_epoch = True
        self._log_at_optimizer_step(with_epoch=ends_epoch)

    @staticmethod
    def monitorable_metrics() -> list[str]:
        """The names this model reports to callbacks (``trainer.callback_metrics``) in ``fit``:
        what ``EarlyStopping``, ``ModelCheckpoint`` and a plateau scheduler may monitor."""
        per_class = [f"val/acc_class/{tag}" for tag in CLASS_TAGS]
        trained = ["train/loss", "train/acc", "train/cross_entropy"]
        return ["val/acc", "val/loss", *per_class, *trained, *TRAIN_EVAL]

    def _log_per_class(self, stage: str) -> None:
        """``val/acc_class/Sandal`` and so on: a class the model never predicts shows as 0."""
        per_class = getattr(self, f"{stage}_acc_class")
        for tag, value in zip(CLASS_TAGS, per_class.compute(), strict=True):  # synced under DDP
            self.log(f"{stage}/acc_class/{tag}", value, **SAME_ON_EVERY_PROCESS)
        per_class.reset()

    def on_validation_epoch_start(self) -> None:
        """In fit, evaluate training images (as many as validation has) as validation evaluates
        its own. Lightning runs the callbacks' hook first: a weight average (EMAWeightAveraging)
        is in place here as it is in ``validation_step``, so both use the same weights."""
        trainer = self.trainer
        batches = getattr(trainer.datamodule, "training_images_to_evaluate", None)
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        self.train_evaluated = fitting and batches is not None
        if not self.train_evaluated:
            return
        with torch.no_grad():
            for batch in batches():
                self._evaluate(batch, "train_eval")

    def _log_training_images(self) -> None:
        """``train_eval/acc`` and ``/loss``, and how much better the training images come out
        than the validation images (accuracy: train - val; loss: val - train): about 0 while
        the model generalises, growing as it overfits."""
        accuracy, loss = self.train_eval_acc.compute(), self.train_eval_loss.compute()  # synced
        self.log("train_eval/acc", self.train_eval_acc)
        self.log("train_eval/loss", self.train_eval_loss)
        gaps = accuracy - self.val_acc.compute(), self.val_loss.compute() - loss
        self.log("train_eval/acc_gap", gaps[0], **SAME_ON_EVERY_PROCESS)
        self.log("train_eval/loss_gap", gaps[1], **SAME_ON_EVERY_PROCESS)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Predicted class index and its softmax probability for each image, with the true
        label (-1 where unknown)."""
        images, labels = batch
        probability, label = self(images).softmax(dim=-1).max(dim=-1)
        return {"label": label, "probability": probability, "target": labels}

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self)
