"""Weight averaging (Lightning's EMAWeightAveraging) from the config, end to end: the test after
fit, a separate test and predict all see the averaged weights the checkpoint holds. (A stop and
resume with it: tests/test_steps_per_call.py.)"""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.datasets import FashionMNIST

from fashion_lightning.cli import main
from fashion_lightning.model import ImageClassifier
from tests.helpers import fit_args, run_cli

pytestmark = pytest.mark.slow

EMA = (
    "--trainer.callbacks+=EMAWeightAveraging",
    "--trainer.callbacks.decay=0.9",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=20",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=3",
    "--model.optimizer.init_args.lr=0.05",
)


def _test_acc(run_dir) -> float:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events.Scalars("test/acc")[-1].value


WARNED: list[str] = []  # what the fit of ema_run warned


@pytest.fixture(scope="module")
def ema_run(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(fit_args(data_dir, root, *EMA, "--model.compile=false"))
    WARNED.extend(str(warning.message) for warning in caught)
    return root / "lightning_logs" / "sgd_0"


def test_weight_averaging_does_not_warn_of_sharding(ema_run):
    # Lightning warns when the model overrides configure_model; this one does not need to
    assert [message for message in WARNED if "configure_model" in message] == []


def test_after_fit_test_measures_the_averaged_weights_a_separate_test_does(
    ema_run, data_dir, tmp_path
):
    best = next(p for p in (ema_run / "checkpoints").iterdir() if p.name.startswith("epoch"))
    checkpoint = torch.load(best, weights_only=True)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    name = "model.linear_relu_stack.0.weight"
    assert not torch.equal(averaged[name], raw[name])  # the two differ: the test can tell

    separate = run_cli("test", *fit_args(data_dir, tmp_path, *EMA)[1:], f"--ckpt_path={best}")
    assert separate.returncode == 0, separate.stderr[-2000:]
    assert _test_acc(tmp_path / "lightning_logs" / "sgd_0") == _test_acc(ema_run)


def test_predict_uses_the_averaged_weights(ema_run, data_dir, tmp_path):
    best = next(p for p in (ema_run / "checkpoints").iterdir() if p.name.startswith("epoch"))
    main(["predict", *fit_args(data_dir, tmp_path, *EMA)[1:], f"--ckpt_path={best}"])
    with (tmp_path / "lightning_logs" / "sgd_0" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))[:1000]

    averaged = ImageClassifier()
    averaged.load_state_dict(torch.load(best, weights_only=True)["state_dict"])
    images = FashionMNIST(str(data_dir), train=False).data[:1000].unsqueeze(1).float() / 255
    with torch.no_grad():
        probability, label = averaged(images).softmax(-1).max(-1)
    assert [int(row["predicted_label"]) for row in rows] == label.tolist()
    assert [float(row["probability"]) for row in rows] == pytest.approx(
        probability.tolist(), abs=1e-5
    )
