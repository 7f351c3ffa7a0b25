"""What each knob of a recipe buys: the recipe, then the recipe minus one knob at a time, each
trained with the same seeds and measured the same way (test accuracy of the checkpoint with
the best ``val/acc``, wall time of the whole command).

    python benchmarks/ablation.py --config fast                # seeds 42 43 44
    python benchmarks/ablation.py --config best --seeds 42

Each run is ``python -m fashion_lightning fit --config configs/NAME.yaml`` plus the overrides
that take one knob out, in a fresh process; the table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from results import run  # the script next to this one (python puts its folder on the path)

# a knob: the config key that sets it in a recipe, and the value that takes it out
KNOBS = {
    "bf16 matrix products (32-bit instead)": ("trainer.precision", "32-true"),
    "weight average (EMA)": ("trainer.callbacks", "[]"),
    "batch 512 (128 instead)": ("data.batch_size", "128"),
    "mirrored training images": ("data.augment_flip", "false"),
    "shifted training images": ("data.augment_shift", "0"),
    "cutout": ("data.augment_cutout", "0"),
    "mirror average at evaluation": ("model.flip_tta", "false"),
    "label smoothing": ("model.label_smoothing", "0"),
    "dropout": ("model.dropout", "0"),
    "weight decay": ("model.optimizer.init_args.weight_decay", "0"),
    "input standardization": ("model.standardize", "false"),
    "one-cycle schedule (the peak lr throughout)": ("model.lr_scheduler", "null"),
    "fused AdamW step (one weight at a time instead)": ("model.optimizer.init_args.fused", "false"),
}
# a knob a recipe went without, put back: what leaving it out bought
ADDED = {
    "dropout 0.15": ("model.dropout", ["--model.dropout=0.15"]),
    "weight average (EMA, decay 0.976)": (
        "trainer.callbacks",
        [
            "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging",
            "--trainer.callbacks.decay=0.976",
        ],
    ),
}


LEFT_OUT = (None, [], False, 0)  # a knob's value in a recipe without it (0.0 == 0)


def recipe_value(recipe: dict, key: str):
    for part in key.split("."):
        recipe = recipe.get(part) if isinstance(recipe, dict) else None
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fast")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    args = parser.parse_args()
    config = Path(__file__).resolve().parents[1] / "configs" / f"{args.config}.yaml"
    recipe = yaml.safe_load(config.read_text())
    variants = {"the recipe": []}
    for name, (key, off) in KNOBS.items():
        value = recipe_value(recipe, key)
        if value not in LEFT_OUT and str(value).lower() != off:  # the recipe has it
            variants[f"without {name}"] = [f"--{key}={off}"]
    for name, (key, overrides) in ADDED.items():
        if recipe_value(recipe, key) in LEFT_OUT:
            variants[f"with {name}"] = overrides
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in variants.items():
            runs = [
                run(args.config, seed, Path(tmp) / f"{len(rows)}-{seed}", *overrides)
                for seed in args.seeds
            ]
            accuracies = [r["test_acc"] for r in runs]
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            seconds = statistics.median(r["seconds"] for r in runs)
            rows.append((name, statistics.mean(accuracies), spread, accuracies, seconds))
            print(f"{name}: {rows[-1][1]:.2f} ± {spread:.2f}% ({seconds:.0f} s)", file=sys.stderr)
    base = rows[0][1]
    seeds = ", ".join(str(s) for s in args.seeds)
    print(f"| configs/{args.config}.yaml | test accuracy (%), seeds {seeds} | change | wall time |")
    print("|---|---|---|---|")
    for name, mean, spread, accuracies, seconds in rows:
        change = "" if name == "the recipe" else f"{mean - base:+.2f}"
        print(
            f"| {name} | {mean:.2f} ± {spread:.2f} ({', '.join(f'{a:.2f}' for a in accuracies)}) | {change} | {seconds:.0f} s |"
        )


if __name__ == "__main__":
    main()
