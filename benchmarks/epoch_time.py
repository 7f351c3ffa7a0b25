"""Epoch time of the tutorial's loop, the bare-PyTorch floor, and this project's ``fit``.

    python benchmarks/epoch_time.py --epochs 3 --repeats 3

Runs, alternating and repeated, each in a fresh process (so peak RSS is its own):

- tutorial: the tutorial's code as written (torchvision FashionMNIST + ToTensor + DataLoader,
  batch 64, SGD lr 1e-3, its train_loop and test_loop);
- floor: the same model, loss and optimizer step over in-memory float tensors, with no
  DataLoader and no Lightning;
- project: ``python -m fashion_lightning fit --config configs/sgd.yaml`` as it runs (logger,
  checkpoints, progress bar on), timed by a callback.

Prints a Markdown table: median seconds per training epoch (scaled to the tutorial's 60,000
images; the project and the floor train on the 55,000 left after the validation split),
median seconds for one evaluation pass over the 10,000 test images, peak RSS, the ratios, and
each variant's last-epoch training loss and test accuracy, so that nothing is faster by
doing less. Exits non-zero if those disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fashion_lightning.network import MLP  # noqa: E402
from fashion_lightning.raw_files import DEBIAN_SOURCE_DIR, ensure_raw_files  # noqa: E402

DATA_DIR = ROOT / "data"
TUTORIAL_EPOCH_IMAGES = 60000
# project variants: extra arguments for the project's fit
PROJECT_VARIANTS = {
    "project": [],
    "project-k1": ["--model.steps_per_call=1"],
    "project-k4": ["--model.steps_per_call=4"],
    "project-k8": ["--model.steps_per_call=8"],
    "project-k16": ["--model.steps_per_call=16"],
    "project-k32": ["--model.steps_per_call=32"],
    "project-bf16": ["--trainer.precision=bf16-mixed"],
    "project-compile": ["--model.compile=true"],
    "project-no-bar": ["--trainer.enable_progress_bar=false"],
    "project-no-images": ["--images.every_n_epochs=0"],
}
VARIANTS = ("tutorial", "floor", *PROJECT_VARIANTS)
DEFAULT_VARIANTS = "tutorial,floor,project-k1,project"
SEED = 42


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tutorial(epochs: int, device: str) -> dict:
    """The tutorial's code, verbatim apart from timing and the device."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import ToTensor

    torch.manual_seed(SEED)
    training_data = datasets.FashionMNIST(root=DATA_DIR, train=True, transform=ToTensor())
    test_data = datasets.FashionMNIST(root=DATA_DIR, train=False, transform=ToTensor())
    train_dataloader = DataLoader(training_data, batch_size=64)
    test_dataloader = DataLoader(test_data, batch_size=64)
    model = MLP().to(device)  # the tutorial's NeuralNetwork (same modules, same init)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train_loop(dataloader):
        model.train()
        total = 0.0
        for X, y in dataloader:
            X, y = X.to(device), y.to(device)
            loss = loss_fn(model(X), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()  # the tutorial prints loss.item() every 100 batches
        return total / len(dataloader)

    def test_loop(dataloader):
        model.eval()
        correct = 0
        with torch.no_grad():
            for X, y in dataloader:
                X, y = X.to(device), y.to(device)
                correct += (model(X).argmax(1) == y).type(torch.float).sum().item()
        return correct / len(dataloader.dataset)

    return _timed_epochs(
        epochs, lambda: train_loop(train_dataloader), lambda: test_loop(test_dataloader), 60000
    )


def run_floor(epochs: int, device: str) -> dict:
    """Same math over in-memory tensors: the least any framework can take."""
    from fashion_lightning.data import FashionMNISTDataModule
    from fashion_lightning.fashion_mnist import to_float_images

    torch.manual_seed(SEED)
    data = FashionMNISTDataModule(data_dir=str(DATA_DIR), seed=SEED)
    data.setup("fit")
    data.setup("test")
    train_x = to_float_images(data.train_set.images).to(device)
    train_y = data.train_set.labels.to(device)
    test_x = to_float_images(data.test_set.images).to(device)
    test_y = data.test_set.labels.to(device)
    model = MLP().to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    epoch = 0

    def train():
        nonlocal epoch
        model.train()
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(SEED + epoch))
        order = order.to(device)
        epoch += 1
        total = torch.zeros((), device=device)
        steps = 0
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            loss = loss_fn(model(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
        return total.item() / steps

    def test():
        model.eval()
        correct = torch.zeros((), device=device)
        with torch.no_grad():
            for start in range(0, len(test_y), 64):
                logits = model(test_x[start : start + 64])
                correct += (logits.argmax(1) == test_y[start : start + 64]).sum()
        return correct.item() / len(test_y)

    return _timed_epochs(epochs, train, test, len(train_y))


def _timed_epochs(epochs, train, test, train_images) -> dict:
    train_seconds, losses = [], []
    for _ in range(epochs):
        _sync()
        start = time.perf_counter()
        losses.append(train())
        _sync()
        train_seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    accuracy = test()
    _sync()
    eval_seconds = time.perf_counter() - start
    return {
        "train_seconds": train_seconds,
        "eval_seconds": [eval_seconds],
        "train_images": train_images,
        "last_epoch_loss": losses[-1],
        "test_acc": accuracy,
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


RESULT: dict = {"train_seconds": [], "eval_seconds": []}


class StageTimer(Callback):
    """Times each training epoch (without its validation) and the test epoch."""

    def __init__(self) -> None:
        self.val_seconds = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        _sync()
        self.start, self.val_seconds = time.perf_counter(), 0.0

    def on_validation_start(self, trainer, pl_module):
        _sync()
        self.val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        _sync()
        self.val_seconds += time.perf_counter() - self.val_start

    def on_train_epoch_end(self, trainer, pl_module):
        _sync()
        RESULT["train_seconds"].append(time.perf_counter() - self.start - self.val_seconds)

    def on_test_epoch_start(self, trainer, pl_module):
        _sync()
        self.test_start = time.perf_counter()

    def on_test_epoch_end(self, trainer, pl_module):
        _sync()
        RESULT["eval_seconds"].append(time.perf_counter() - self.test_start)


class LossRecorder(Callback):
    """Mean training loss of each epoch, from the step losses (no change to the model)."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.total, self.steps = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        losses = outputs["losses"] if "losses" in outputs else outputs["loss"].detach()[None]
        self.total = self.total + losses.sum()
        self.steps += len(losses)

    def on_train_epoch_end(self, trainer, pl_module):
        RESULT["last_epoch_loss"] = float(self.total) / self.steps


def run_project(epochs: int, device: str, extra: list[str]) -> dict:
    from fashion_lightning.cli import main

    os.environ["FASHION_LIGHTNING_TRUSTED_IMPORTS"] = "__main__"  # this script's timers

    with tempfile.TemporaryDirectory() as root, open(os.devnull, "w") as devnull:
        with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
            main(
                [
                    "fit",
                    "--config",
                    str(ROOT / "configs" / "sgd.yaml"),
                    f"--data.data_dir={DATA_DIR}",
                    f"--trainer.max_epochs={epochs}",
                    f"--trainer.default_root_dir={root}",
                    f"--trainer.accelerator={device if device != 'cuda' else 'gpu'}",
                    "--trainer.callbacks+=__main__.StageTimer",
                    "--trainer.callbacks+=__main__.LossRecorder",
                    *extra,
                ]
            )
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(Path(root) / "lightning_logs" / "sgd_0"))
        events.Reload()
        test_acc = events.Scalars("test/acc")[-1].value
    return {
        "train_seconds": RESULT["train_seconds"],
        "eval_seconds": RESULT["eval_seconds"],
        "train_images": 55000,
        "last_epoch_loss": RESULT["last_epoch_loss"],
        "test_acc": test_acc,
    }


def worker(variant: str, epochs: int, device: str, extra: list[str]) -> None:
    if variant == "tutorial":
        result = run_tutorial(epochs, device)
    elif variant == "floor":
        result = run_floor(epochs, device)
    else:
        result = run_project(epochs, device, PROJECT_VARIANTS[variant] + extra)
    result["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(result))


def _spawn(variant: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--epochs", str(args.epochs)]
    command += ["--device", args.device, *(["--", *args.extra] if args.extra else [])]
    output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
    if output.returncode != 0 or not lines:
        sys.exit(f"{variant} failed:\n{output.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="after --: extra arguments for the project's fit")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.epochs, args.device, args.extra)
        return

    ensure_raw_files(DATA_DIR, DEBIAN_SOURCE_DIR, download=False)
    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in variants:
            runs[variant].append(_spawn(variant, args))
            print(f"repeat {repeat + 1}/{args.repeats}: {variant} done", file=sys.stderr)

    rows = {}
    for variant, results in runs.items():
        per_epoch = [
            seconds * TUTORIAL_EPOCH_IMAGES / r["train_images"]
            for r in results
            for seconds in r["train_seconds"]
        ]
        rows[variant] = {
            "train": statistics.median(per_epoch),
            "eval": statistics.median(s for r in results for s in r["eval_seconds"]),
            "rss": max(r["peak_rss_mb"] for r in results),
            "loss": statistics.median(r["last_epoch_loss"] for r in results),
            "acc": statistics.median(r["test_acc"] for r in results),
        }
    _print_table(rows, args)
    _check_comparable(rows)


def _ratio(rows, a, b, key) -> str:
    if a in rows and b in rows:
        return f"{rows[a][key] / rows[b][key]:.2f}x"
    return "-"


def _print_table(rows, args) -> None:
    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    )
    print(
        f"\n{args.epochs} epochs x {args.repeats} repeats, medians; {device}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, device {args.device}\n"
    )
    print(
        "| variant | train epoch (s, 60k images) | / floor | tutorial / this "
        "| eval pass (s, 10k images) | tutorial / this | peak RSS (MB) "
        "| last-epoch train loss | test acc |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, row in rows.items():
        print(
            f"| {variant} | {row['train']:.2f} | {_ratio(rows, variant, 'floor', 'train')} "
            f"| {_ratio(rows, 'tutorial', variant, 'train')} | {row['eval']:.3f} "
            f"| {_ratio(rows, 'tutorial', variant, 'eval')} | {row['rss']:.0f} "
            f"| {row['loss']:.4f} | {row['acc']:.4f} |"
        )


def _check_comparable(rows) -> None:
    """Same model and optimizer: losses and accuracies must agree (orders differ slightly)."""
    losses = [row["loss"] for row in rows.values()]
    accuracies = [row["acc"] for row in rows.values()]
    if max(losses) > 1.15 * min(losses) or max(accuracies) - min(accuracies) > 0.05:
        sys.exit(f"variants disagree: losses {losses}, accuracies {accuracies}")


if __name__ == "__main__":
    main()
