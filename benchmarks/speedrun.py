"""The speedrun: ``fit --config configs/fast.yaml``, timed whole, beside the tutorial's own run.

    python benchmarks/speedrun.py                   # seeds 42 43 44, each beside a tutorial run
    python benchmarks/speedrun.py --seeds 42 --curve docs/time_to_accuracy.png

Each run is the plain command in a fresh process, start-up, validation and the final test
included, as a user types it (another seed S adds ``--seed_everything S --data.seed S``).
The machine's speed drifts, so each fast.yaml run is timed right after a run of
``configs/sgd.yaml`` (the tutorial: 10 epochs, about 70%): the goal is 90% test accuracy in at
most twice the time the tutorial takes to reach 70%, and in at most 60 s.

``--curve`` also draws test accuracy against wall time for both: the runs keep a checkpoint at
each epoch's end (the same run: checkpoints are written after the epoch's work), and each is
tested afterwards, outside the timed command; an epoch's time is its checkpoint's, counted from
the command's start.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import CONFIG_SEED, run  # noqa: E402 - the script next to this one

GOAL_ACCURACY, GOAL_SECONDS, GOAL_RATIO = 90.0, 60.0, 2.0


def curve(config: str, root: Path) -> list[tuple[float, float]]:
    """(seconds since the command began, test accuracy %) at each epoch's end of ``config``."""
    keep_each_epoch = [  # a checkpoint at each epoch's end: each validates (a little slower)
        "--checkpoint.monitor=null",
        "--checkpoint.save_top_k=-1",
        "--trainer.check_val_every_n_epoch=1",
    ]
    started = time.time()
    run(config, CONFIG_SEED, root, *keep_each_epoch)
    from fashion_lightning.data import FashionMNISTDataModule
    from fashion_lightning.model import ImageClassifier

    data = FashionMNISTDataModule(data_dir=str(ROOT / "data"))
    data.prepare_data()
    data.setup("test")
    images, labels = data.test_set.images, data.test_set.labels
    points = []
    folder = root / "lightning_logs" / f"{config}_0" / "checkpoints"
    for path in sorted(folder.glob("epoch*.ckpt"), key=lambda p: p.stat().st_mtime):
        model = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            accuracy = (model.eval()(images).argmax(dim=1) == labels).float().mean().item()
        points.append((path.stat().st_mtime - started, accuracy * 100))
    return points


def draw(curves: dict[str, list[tuple[float, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        seconds, accuracy = zip(*points, strict=True)
        axes.plot(seconds, accuracy, marker="o", label=name)
    axes.axhline(GOAL_ACCURACY, color="grey", linestyle=":", label=f"{GOAL_ACCURACY:.0f}%")
    axes.set(
        xlabel="seconds since the command began (start-up included)", ylabel="test accuracy (%)"
    )
    axes.set_ylim(60, 92)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title("Test accuracy against wall time, one epoch a point (2-core CPU)")
    figure.savefig(out, dpi=110, bbox_inches="tight")
    print(f"curve: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--curve", type=Path, help="also draw test accuracy against wall time")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            tutorial_run = run("sgd", CONFIG_SEED, Path(tmp) / f"sgd-{seed}")
            fast_run = run("fast", seed, Path(tmp) / f"fast-{seed}")
            tutorial, tutorial_acc = tutorial_run["seconds"], tutorial_run["test_acc"]
            fast, fast_acc = fast_run["seconds"], fast_run["test_acc"]
            rows.append((seed, fast, fast_acc, tutorial, tutorial_acc))
            print(
                f"seed {seed}: fast {fast:.1f} s {fast_acc:.2f}%, tutorial {tutorial:.1f} s "
                f"{tutorial_acc:.2f}%",
                file=sys.stderr,
            )
        if args.curve:
            curves = {
                "configs/fast.yaml": curve("fast", Path(tmp) / "fast-curve"),
                "configs/sgd.yaml (the tutorial)": curve("sgd", Path(tmp) / "sgd-curve"),
            }
            draw(curves, args.curve)
    print(
        "| seed | fast.yaml: test accuracy | fast.yaml: wall time | tutorial (sgd.yaml) beside it | ratio |"
    )
    print("|---|---|---|---|---|")
    for seed, fast, fast_acc, tutorial, tutorial_acc in rows:
        print(
            f"| {seed} | {fast_acc:.2f}% | {fast:.1f} s | {tutorial:.1f} s ({tutorial_acc:.2f}%) "
            f"| {fast / tutorial:.2f}x |"
        )
    accuracies = [r[2] for r in rows]
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    worst_ratio = max(r[1] / r[3] for r in rows)
    slowest = max(r[1] for r in rows)
    print(
        f"\nmean test accuracy {statistics.mean(accuracies):.2f} ± {spread:.2f}% "
        f"(goal {GOAL_ACCURACY:.1f}%); slowest run {slowest:.1f} s (goal {GOAL_SECONDS:.0f} s); "
        f"largest ratio to the tutorial's run {worst_ratio:.2f}x (goal {GOAL_RATIO:.1f}x)"
    )


if __name__ == "__main__":
    main()
