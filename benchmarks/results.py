"""Test accuracy of each config over several seeds, as a Markdown table; and a check that the
README's table is what the commands give today.

    python benchmarks/results.py                  # all configs, seeds 42 43 44 (make results)
    python benchmarks/results.py --configs best --seeds 42
    python benchmarks/results.py --check          # the quick rows against the README (make check-results)

Each run is ``python -m fashion_lightning fit --config configs/NAME.yaml`` in a fresh process,
like a user's; seed 42 is the configs' own, so that row is the plain command, and another
seed S adds ``--seed_everything S --data.seed S``. The table gives the official test split's
accuracy (mean ± std over seeds, and each seed's), the epoch whose ``val/acc`` was best (the
checkpoint that was tested), and the wall time per run on this machine, with published
anchors for comparison. It is printed and written to ``benchmarks/results.md``.

``--check`` reruns the seed-42 row of the quick configs (sgd, adam, rmsprop, fast: minutes) and
exits 1 naming every figure of the README's table that the command no longer gives. On one
CPU a run repeats exactly. Another kind of CPU (AVX2 against AVX512 kernels) rounds
differently and the run drifts like another seed would (adam.yaml: 89.10% on one, 88.37% on
another, its seeds 88.47-89.10): a figure that is not exact passes when it lies within the
row's mean ± 2 std (at least ± ``ANOTHER_CPU``), and is shown as not exact. A regression
of a point or more fails either way.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fashion_lightning.run_records import read_run  # what the runs table reads

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("sgd", "adam", "rmsprop", "best", "fast")
ANCHORS = (
    ("the tutorial (SGD lr 1e-3, 10 epochs), as published", "71.7"),
    ("Zalando's benchmark, best MLPClassifier", "87.1"),
    ("Zalando's benchmark, best classical model (SVC)", "89.7"),
    ("784-512-512-10 MLP, Adam 1e-3, 10 epochs, as reported", "about 87.6"),
)


CONFIG_SEED = 42  # the seed the configs set: its row is the plain fit command
QUICK = ("sgd", "adam", "rmsprop", "fast")
ANOTHER_CPU = 0.2  # points: the least drift allowed on another CPU (a row's 2 std may be less)


def run(config: str, seed: int, root: Path, *extra: str) -> dict:
    seeds = [] if seed == CONFIG_SEED else [f"--seed_everything={seed}", f"--data.seed={seed}"]
    command = [
        sys.executable,
        "-m",
        "fashion_lightning",
        "fit",
        "--config",
        str(ROOT / "configs" / f"{config}.yaml"),
        *seeds,
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{config} seed {seed} failed:\n{result.stderr[-3000:]}")
    record = read_run(root / "lightning_logs" / f"{config}_0", root)  # named after its config
    return {
        "test_acc": record.test_acc * 100,
        "best_epoch": record.best_epoch,  # counted from 1 (a config may validate every few)
        "epochs": record.epochs_done,
        "seconds": seconds,
    }


def readme_rows(readme: Path) -> dict[str, tuple[float, float, str]]:
    """Each config row of the README's table: its mean, its std and its seed-42 figure (the
    first of "per seed", as written)."""
    found = {}
    for line in readme.read_text().splitlines():
        match = re.match(
            r"\| `configs/(\w+)\.yaml`[^|]*\| ([0-9.]+) ± ([0-9.]+) \| ([0-9.]+),", line
        )
        if match:
            found[match.group(1)] = (float(match.group(2)), float(match.group(3)), match.group(4))
    return found


def check(configs: list[str]) -> None:
    """Exit 1 unless each config's seed-42 run gives the README's figure, exactly or (another
    CPU's drift) within the row's spread."""
    recorded = readme_rows(ROOT / "README.md")
    wrong = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            now = f"{run(config, CONFIG_SEED, Path(tmp) / config)['test_acc']:.2f}"
            if config not in recorded:
                wrong.append(f"configs/{config}.yaml has no row in the README's table")
                continue
            mean, std, then = recorded[config]
            allowed = max(2 * std, ANOTHER_CPU)
            if now == then:
                verdict = "exactly"
            elif abs(float(now) - mean) <= allowed:
                verdict = f"not exactly, within {mean:.2f} ± {allowed:.2f}: another CPU?"
            else:
                verdict = f"outside {mean:.2f} ± {allowed:.2f}"
                wrong.append(
                    f"configs/{config}.yaml seed 42: README says {then} ({mean:.2f} ± {std:.2f} "
                    f"over seeds), the command gives {now}"
                )
            print(f"{config}: README {then}, now {now} ({verdict})", file=sys.stderr)
    if wrong:
        sys.exit("the README's results differ from what the commands give: " + "; ".join(wrong))
    print(f"README results reproduced: {', '.join(configs)} (seed 42)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    parser.add_argument("--check", action="store_true", help="the README's seed-42 figures")
    args = parser.parse_args()
    if args.check:
        check(args.configs or list(QUICK))
        return
    args.configs = args.configs or list(CONFIGS)

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
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    text = (
        f"Seeds {seeds}; each run in a fresh process on this machine ({os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}), commit {commit or 'unknown'} "
        f"(`python benchmarks/results.py`).\n\n{table}\n"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
