"""What a search leaves a user: the table of the best trials, Optuna's plots, the best trial's
complete config (``best.yaml``) and, if asked, its test accuracy over several seeds."""

from __future__ import annotations

import shlex
import statistics
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from optuna.trial import FrozenTrial, TrialState

from fashion_lightning import cli
from fashion_lightning.errors import SearchError, UserError, one_line
from fashion_lightning.tune.space import config_text, overrides
from fashion_lightning.tune.storage import shown

if TYPE_CHECKING:
    from fashion_lightning.tune.search import Search


def summary(search: Search) -> Path:
    """Print the best trials, draw Optuna's plots, write the best trial's config."""
    trials = search.study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    minutes = sum(t.user_attrs.get("seconds", 0) for t in trials) / 60
    print(
        f"study {search.name} ({shown(search.storage_spec)}): {len(trials)} trials, "
        f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed, {minutes:.1f} min of training"
    )
    finished = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE),
        key=lambda t: -t.value if search.maximize else t.value,
    )
    if not finished:
        raise UserError(
            f"study {search.name}: no trial completed ({counts[TrialState.PRUNED]} pruned, "
            f"{counts[TrialState.FAIL]} failed), so there is no best config; search more "
            "with a higher --trials, or --pruner none"
        )
    keys = list(search.space)
    print(" | ".join(["trial", search.objective, "epochs", "seconds", *keys]))
    for trial in finished[:10]:
        cells = [
            str(trial.number),
            f"{trial.value:.4f}",
            str(len(trial.intermediate_values)),
            str(trial.user_attrs.get("seconds", "")),
            *(_short(trial.params.get(key)) for key in keys),
        ]
        print(" | ".join(cells))
    plot(search)
    return write_best(search, finished[0])


def _short(value: Any) -> str:
    """A value as the config writes it (null, true), fractions to 4 digits."""
    return f"{value:.4g}" if isinstance(value, float) else config_text(value)


def plot(search: Search) -> None:
    """Optuna's optimization history and parameter importances, next to the study."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, draw in (
            ("history", plots.plot_optimization_history),
            ("importances", plots.plot_param_importances),
        ):
            try:
                axes = draw(search.study)
            except (ValueError, RuntimeError, TypeError) as err:  # e.g. 1 finished trial
                print(f"no {name} plot yet: {err}", file=sys.stderr)
                continue
            path = search.folder / f"{name}.png"
            axes.figure.savefig(path, dpi=110, bbox_inches="tight")
            matplotlib.pyplot.close(axes.figure)
            print(f"plot: {path}")


def write_best(search: Search, best: FrozenTrial) -> Path:
    """The best trial's complete config, runnable as ``fit --config`` as it is."""
    text = best.user_attrs.get("config")
    if text is None:  # a trial of an earlier version, which kept it only in its folder
        kept = Path(best.user_attrs.get("run_dir", "?")) / "config.yaml"
        try:
            text = kept.read_text()
        except OSError as err:
            raise SearchError(
                f"the best trial, {best.number}, kept its config in {kept}, which cannot be "
                f"read ({err.strerror}); restore that folder, or search on with --trials"
            ) from None
    config = yaml.safe_load(text)  # a mapping: the study's records were checked when opened
    config["ckpt_path"] = None
    path = search.folder / "best.yaml"
    if path.resolve() == search.config_path.resolve():
        raise SearchError(
            f"--config {search.config_path} is where this study writes its best config: "
            "copy it elsewhere, or start another study with --study NAME"
        )
    curve = best.intermediate_values  # the objective after each epoch
    pick = max if search.maximize else min
    epoch = pick(curve, key=curve.get) + 1 if curve else "?"
    header = (
        f"# Best trial of the search '{search.name}': trial {best.number}, "
        f"{search.objective} {best.value:.4f} at epoch {epoch} of {len(curve)}.\n"
        f"# Sampled: {one_line(' '.join(overrides(best.params)))}\n"
        f"#   python -m fashion_lightning fit --config {shlex.quote(str(path))}\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def confirm(search: Search, best_config: Path, seeds: int) -> None:
    """Retrain the best config with several seeds and report the official test accuracy on
    the whole test split (whatever part of it the trials' config tests): the only step of the
    search that reads the test split."""
    accuracies = []
    for seed in range(42, 42 + seeds):
        run_dir, again = search.folder / f"confirm_seed_{seed}", 1
        while run_dir.exists():  # confirmed before: keep that run, and its numbers
            again += 1
            run_dir = search.folder / f"confirm_seed_{seed}_{again}"
        args = [
            "fit",
            "--config",
            str(best_config),
            f"--seed_everything={seed}",
            f"--data.seed={seed}",
            "--trainer.limit_test_batches=1.0",  # the whole split, not the trials' limit
        ]
        fit = cli.run(args, run_dir=run_dir)
        accuracy = float(fit.trainer.callback_metrics["test/acc"]) * 100
        accuracies.append(accuracy)
        images = len(fit.datamodule.test_set)
        print(f"confirm seed {seed}: test/acc {accuracy:.2f}% on {images} test images -> {run_dir}")
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    print(
        f"test accuracy of {best_config} over {seeds} seeds, each on the whole test split: "
        f"{statistics.mean(accuracies):.2f} ± {spread:.2f}% "
        f"({', '.join(f'{a:.2f}' for a in accuracies)})"
    )
