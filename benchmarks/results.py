"""Test accuracy of each config over several seeds, as a Markdown table.

    python benchmarks/results.py                  # all configs, seeds 42 43 44 (make results)
    python benchmarks/results.py --configs best --seeds 42

Each run is ``python -m fashion_lightning fit --config configs/NAME.yaml`` with
``--seed_everything S --data.seed S`` in a fresh process, like a user's. The table gives the
official test split's accuracy (mean ± std over seeds, and each seed's), the epoch whose
``val/acc`` was best (the checkpoint that was tested), and the wall time per run on this
machine, with published anchors for comparison. It is printed and written to
``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("sgd", "adam", "rmsprop", "best")
ANCHORS = (
    ("the tutorial (SGD lr 1e-3, 10 epochs), as published", "71.7"),
    ("Zalando's benchmark, best MLPClassifier", "87.1"),
    ("Zalando's benchmark, best classical model (SVC)", "89.7"),
    ("784-512-512-10 MLP, Adam 1e-3, 10 epochs, as reported", "about 87.6"),
)


def run(config: str, seed: int, root: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "fashion_lightning",
        "fit",
        "--config",
        str(ROOT / "configs" / f"{config}.yaml"),
        f"--seed_everything={seed}",
        f"--data.seed={seed}",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{config} seed {seed} failed:\n{result.stderr[-3000:]}")
    events = EventAccumulator(str(root / "lightning_logs" / "version_0"))
    events.Reload()
    val_acc = [e.value for e in events.Scalars("val/acc")]
    return {
        "test_acc": events.Scalars("test/acc")[-1].value * 100,
        "best_epoch": val_acc.index(max(val_acc)) + 1,
        "epochs": len(val_acc),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()

    lines = [
        "| config | test accuracy (%), mean ± std | per seed | best epoch / epochs | wall time per run |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            runs = []
            for seed in args.seeds:
                runs.append(run(config, seed, Path(tmp) / f"{config}-{seed}"))
                print(f"{config} seed {seed}: {runs[-1]}", file=sys.stderr)
            accuracies = [r["test_acc"] for r in runs]
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            lines.append(
                f"| `configs/{config}.yaml` | {statistics.mean(accuracies):.2f} ± {spread:.2f} "
                f"| {', '.join(f'{a:.2f}' for a in accuracies)} "
                f"| {', '.join(str(r['best_epoch']) for r in runs)} / {runs[0]['epochs']} "
                f"| {statistics.median(r['seconds'] for r in runs):.0f} s |"
            )
    for name, accuracy in ANCHORS:
        lines.append(f"| {name} | {accuracy} | | | |")
    seeds = " ".join(str(s) for s in args.seeds)
    table = "\n".join(lines)
    text = (
        f"Seeds {seeds}; each run in a fresh process on this machine "
        f"(`python benchmarks/results.py`).\n\n{table}\n"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
