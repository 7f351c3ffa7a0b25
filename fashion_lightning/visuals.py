"""What TensorBoard shows beyond curves: a layout that opens on learning, hyperparameters that
compare runs, and when the prediction grids and confusion matrices are written (how they are
drawn: :mod:`fashion_lightning.drawings`)."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from fashion_lightning.drawings import render_confusion_matrix, render_predictions
from fashion_lightning.fashion_mnist import CLASS_NAMES

HP_METRIC = "hp_metric"  # Lightning's name for the run's headline metric: the best val/acc

# The learning curves again, against epochs done (step 1: after the first epoch), so that
# runs of any batch size line up. TensorBoard's Time Series sorts its groups by name and opens
# the first two: "epoch" comes before "hp_metric", "test", "train" and "val"; within it, the
# gap comes first. Train is the training images evaluated as validation evaluates its own,
# with the same weights (train_eval/*, see ImageClassifier.on_validation_epoch_start).
EPOCH_CURVES = {
    "train_eval/acc_gap": "epoch/acc_gap",
    "train_eval/acc": "epoch/acc_train",
    "val/acc": "epoch/acc_val",
    "train_eval/loss_gap": "epoch/loss_gap",
    "train_eval/loss": "epoch/loss_train",
    "val/loss": "epoch/loss_val",
}
# TensorBoard's charts hide the lowest and highest 5% of a chart's values until its
# "Ignore outliers" setting is unticked: a one-cycle schedule's warm-up and tail among them
OUTLIERS = "untick Ignore outliers in chart scaling, on the left, to see all of it"
SAME_WEIGHTS = "train: training images evaluated as validation's, with the same weights"


def _chart(tag: str) -> list:
    """A chart of one tag: one line a run, told apart by the run's colour in the run list
    (TensorBoard tells the tags of a chart apart by marker shapes it hands out per run)."""
    return ["Multiline", [f"^{tag}$"]]


# TensorBoard's Custom Scalars tab, in this order: does it overfit, train next to val, and
# what training did at each step. Two charts fit side by side at 1280 px.
LAYOUT = {
    "Does it overfit? Train against val, epoch by epoch (to see every point: untick Ignore "
    "outliers)": {
        "accuracy gap: train minus val (flat near 0: it generalises; climbing: it overfits)": (
            _chart("epoch/acc_gap")
        ),
        "loss gap: val minus train cross-entropy (climbing: it overfits)": _chart("epoch/loss_gap"),
    },
    f"Accuracy against epochs ({SAME_WEIGHTS})": {
        "val accuracy": _chart("epoch/acc_val"),
        "train accuracy": _chart("epoch/acc_train"),
    },
    f"Loss against epochs: cross-entropy ({SAME_WEIGHTS})": {
        "val loss": _chart("epoch/loss_val"),
        "train loss": _chart("epoch/loss_train"),
    },
    "Training, against steps": {
        "train/loss: the loss optimized (label-smoothed where the config says so)": _chart(
            "train/loss"
        ),
        f"learning rate ({OUTLIERS})": _chart("train/lr"),
    },
    "Accuracy per class": {
        "val": ["Multiline", [r"^val/acc_class/"]],
        "test": ["Multiline", [r"^test/acc_class/"]],
    },
}
# The HParams tab's metric columns: (tag, column title). TensorBoard shows a tag's last value.
METRIC_COLUMNS = (
    (HP_METRIC, "val/acc (best)"),
    ("val/best_epoch", "best epoch"),
    ("test/acc", "test/acc (best ckpt)"),
    ("val/acc", "val/acc (last)"),
    ("val/loss", "val/loss (last)"),
    ("train_eval/acc_gap", "train - val acc (last)"),
)
# TensorBoard shows five hparam columns until you tick more; these five come first.
FIRST_COLUMNS = ("optimizer", "lr", "batch_size", "epochs", "scheduler")


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger, wherever it is in the list of loggers."""
    return next((x for x in trainer.loggers if isinstance(x, TensorBoardLogger)), None)


def metrics_step(trainer: L.Trainer) -> int:
    """The step at which Lightning logs this epoch's metrics (``val/acc``...), so that pictures
    and ``hp_metric`` line up with them: the optimizer steps done."""
    return trainer.global_step


def _class_name(value: Any) -> str:
    """``torch.optim.AdamW`` from a class, a partial of it, or a ``class_path`` dict."""
    if isinstance(value, dict):
        return value.get("class_path", "?").rsplit(".", 1)[-1]
    target = getattr(value, "func", value)  # jsonargparse hands classes over as partials
    return getattr(target, "__name__", str(target))


def _init_args(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value.get("init_args") or {})
    return dict(getattr(value, "keywords", {}) or {})


def run_hparams(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """The run's hyperparameters as the same fixed columns for every run of the project.

    A value a run does not use is 0 or "none", so that runs with different optimizers line up.
    Numbers are text as a person writes them (0.001, 64): TensorBoard prints every number with
    five digits (0.0010000, 64.000). No machine paths: they do not tell runs apart.
    """
    model = pl_module.hparams
    data = trainer.datamodule.hparams if trainer.datamodule is not None else {}
    optimizer, scheduler = model.get("optimizer"), model.get("lr_scheduler")
    args = _init_args(optimizer)
    augmentation = [
        *(["flip"] if data.get("augment_flip") else []),
        *([f"shift {data['augment_shift']}px"] if data.get("augment_shift") else []),
    ]
    averaging = [type(c).__name__ for c in trainer.callbacks if isinstance(c, WeightAveraging)]
    seed_everything = os.environ.get("PL_GLOBAL_SEED", "none")
    seed = str(data.get("seed", "none"))
    return {
        "optimizer": _class_name(optimizer),
        "lr": _number(args.get("lr", 0.0)),
        "batch_size": str(data.get("batch_size", "none")),
        "epochs": str(trainer.max_epochs),
        "scheduler": "none"
        if scheduler is None
        else f"{_class_name(scheduler)} per {model.get('scheduler_interval', 'epoch')}",
        "weight_decay": _number(args.get("weight_decay", 0.0)),
        "momentum": _number(args.get("momentum", 0.0)),
        "dropout": _number(model.get("dropout", 0.0)),
        "label_smoothing": _number(model.get("label_smoothing", 0.0)),
        "augmentation": " + ".join(augmentation) or "none",
        "weight_averaging": " + ".join(averaging) or "none",
        "flip_tta": bool(model.get("flip_tta", False)),
        "hidden_size": str(model.get("hidden_size", "none")),
        "seed": seed if seed == seed_everything else f"{seed} (init {seed_everything})",
        "precision": str(trainer.precision),
        "devices": str(trainer.world_size),
    }


def _number(value: Any) -> str:
    """0.001, 5e-05, 0.1: the shortest text that gives the number back."""
    return repr(float(value)) if float(value) != int(float(value)) else str(int(float(value)))


def _all_arguments(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    datamodule = trainer.datamodule
    arguments = {
        "model": dict(pl_module.hparams_initial),
        "data": dict(datamodule.hparams_initial) if datamodule is not None else {},
        "trainer": {"max_epochs": trainer.max_epochs, "precision": trainer.precision},
    }
    for group in arguments.values():
        group.pop("_instantiator", None)
    return arguments


def _column_value(value: Any) -> float | bool | str:
    """Fractions as numbers; whole numbers and everything else as text (as run_hparams)."""
    return value if isinstance(value, (bool, float)) else str(value)


def hparams_summaries(
    params: dict[str, Any], first: tuple[str, ...] = FIRST_COLUMNS
) -> list[Summary]:
    """The HParams plugin's experiment (columns) and session-start (values) entries.

    Written here rather than with ``torch.utils.tensorboard.summary.hparams`` because that
    cannot mark columns ``differs``, which orders TensorBoard's columns and picks the five it
    shows before any clicking, nor give metric columns a title.
    """
    kind = {bool: api_pb2.DATA_TYPE_BOOL, float: api_pb2.DATA_TYPE_FLOAT64}
    columns = [
        api_pb2.HParamInfo(
            name=name,
            type=kind.get(type(value), api_pb2.DATA_TYPE_STRING),
            differs=name in first,
        )
        for name, value in params.items()
    ]
    metrics = [
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=title)
        for tag, title in METRIC_COLUMNS
    ]
    session = plugin_data_pb2.SessionStartInfo()
    for name, value in params.items():
        if isinstance(value, bool):
            session.hparams[name].bool_value = value
        elif isinstance(value, float):
            session.hparams[name].number_value = value
        else:
            session.hparams[name].string_value = value
    return [
        _hparams_plugin_summary(
            metadata.EXPERIMENT_TAG,
            experiment=api_pb2.Experiment(hparam_infos=columns, metric_infos=metrics),
        ),
        _hparams_plugin_summary(metadata.SESSION_START_INFO_TAG, session_start_info=session),
    ]


def _hparams_plugin_summary(tag: str, **data: Any) -> Summary:
    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data)
    plugin = SummaryMetadata.PluginData(
        plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString()
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


class HParamsSummary(Callback):
    """Writes what TensorBoard needs to compare runs at a glance, once per run:

    - the HParams entry: the same fixed columns for every run (:func:`run_hparams`), and the
      metric columns ``hp_metric`` (the best ``val/acc``), ``val/best_epoch``, ``test/acc``,
      the last ``val/acc`` and ``val/loss``;
    - the Custom Scalars layout: train and val loss on one chart, train and val accuracy on
      another, the learning rate, the accuracy of each class;
    - after every validation, ``hp_metric`` and ``val/best_epoch`` at the step of ``val/acc``.

    Lightning's own HParams entry holds only the model's and data's arguments and sets
    ``hp_metric`` to -1; TensorBoard keeps the first entry of a run, so this is the only one.
    Every other logger gets the same arguments (CSVLogger's ``hparams.yaml``, MLflow's params)
    and the ``hp_metric`` values.
    """

    def __init__(self, searched: dict[str, Any] | None = None) -> None:
        """``searched``: a search trial's sampled values (dotted config keys), shown as the
        first columns so that the trials of a search compare on what was searched."""
        self.searched = searched or {}
        self.best = float("nan")
        self.best_epoch = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        arguments = _all_arguments(trainer, pl_module)
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                # every logger gets the arguments: CSVLogger's hparams.yaml, MLflow's params
                logger.log_hyperparams(arguments)
                continue
            # hparams.yaml keeps every argument (metrics={}: no -1 placeholder in TensorBoard)
            logger.log_hyperparams(arguments, metrics={})
            searched = {key: _column_value(value) for key, value in self.searched.items()}
            params = {**searched, **run_hparams(trainer, pl_module)}
            experiment = logger.experiment
            writer = experiment.file_writer  # SummaryWriter has no call for these summaries
            for summary in hparams_summaries(params, first=(*searched, *FIRST_COLUMNS)):
                writer.add_summary(summary)
            experiment.add_custom_scalars(LAYOUT)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        accuracy = trainer.callback_metrics.get("val/acc")
        if trainer.sanity_checking or accuracy is None:
            return
        accuracy = float(accuracy)
        if not accuracy <= self.best:  # also replaces the initial NaN
            self.best, self.best_epoch = accuracy, trainer.current_epoch + 1
        values = {HP_METRIC: self.best, "val/best_epoch": self.best_epoch}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=metrics_step(trainer))

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.best = state_dict["best"]
        self.best_epoch = state_dict.get("best_epoch", 0)


class ClassificationImages(Callback):
    """TensorBoard images: each validation epoch a grid of validation images with predicted
    class, its probability and the true class (wrong ones framed red), and the confusion
    matrix; the test confusion matrix at the end of testing. They are logged at the step of
    the epoch's ``val/*`` (``test/*``) scalars."""

    def __init__(self, every_n_epochs: NonNegativeInt = 1, num_images: PositiveInt = 16) -> None:
        """
        Args:
            every_n_epochs: Draw the validation images every this many epochs; 0 switches
                the images off (the test confusion matrix too).
            num_images: How many validation images the grid shows (the first ones of the
                validation set, so the same images are watched across epochs), four a row.
        """
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.confusion = MulticlassConfusionMatrix(len(CLASS_NAMES))
        self.samples: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

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
        probability, predicted = outputs.softmax(dim=1).max(dim=1)
        self.confusion.update(predicted, labels)
        if batch_idx == 0:
            keep = slice(0, self.num_images)
            self.samples = tuple(t[keep].cpu() for t in (images, predicted, labels, probability))

    def _finish(self, trainer: L.Trainer, stage: str) -> None:
        if not self._active(trainer):
            return
        matrix = self.confusion.compute()  # every rank takes part: it syncs under DDP
        logger = _tensorboard(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        step = metrics_step(trainer)
        epochs = f"/{trainer.max_epochs}" if (trainer.max_epochs or -1) > 0 else ""
        epoch = f", epoch {trainer.current_epoch + 1}{epochs}" if stage == "val" else ""
        title = f"{stage} confusion matrix{epoch}, % of each true class"
        logger.experiment.add_image(
            f"{stage}/confusion_matrix", render_confusion_matrix(matrix, title), step
        )
        if stage == "val" and self.samples is not None:
            title = f"val predictions{epoch}: red = wrong"
            grid = render_predictions(*self.samples, title=title)
            logger.experiment.add_image("val/predictions", grid, step)

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
