"""``python -m fashion_lightning runs``: the runs under a folder, one row each, best first.

    python -m fashion_lightning runs                        # lightning_logs/, as a table
    python -m fashion_lightning runs --root elsewhere --csv  # or --json, for scripts
    python -m fashion_lightning runs --plot runs.png        # val/acc and the losses per epoch

A row: the run's folder, its config, the settings that differ between the runs listed, the
epochs done and planned, the best ``val/acc`` and its epoch, ``test/acc``, the wall time and
whether it finished, was stopped (``--ckpt_path last`` continues it), still runs or failed.
It reads what every run writes already (runs made before this command included); a folder it
cannot read is listed with the reason.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path

from fashion_lightning.errors import OneLineErrorParser, UserError, exit_with
from fashion_lightning.run_records import RunRecord, find_run_folders, is_run_folder, read_run

PROG = "python -m fashion_lightning runs"
# the settings that set a run apart come last: they are as long as they are many
COLUMNS = (
    "run",
    "config",
    "epochs",
    "best val/acc",
    "epoch",
    "test/acc",
    "time",
    "state",
    "differs",
)


def parse_args(argv: list[str]):
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("lightning_logs"),
        help="where the runs are (lightning_logs)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw val/acc and the losses per epoch"
    )
    return parser.parse_args(argv)


def collect(root: Path) -> list[RunRecord]:
    """Every run under ``root``, best ``val/acc`` first (runs without one last, by name)."""
    if root.exists() and not root.is_dir():
        raise UserError(
            f"--root {root}: a file, not a folder; give the folder the runs are in "
            "(lightning_logs) or a run's own folder"
        )
    if not root.is_dir():
        raise UserError(
            f"--root {root}: no such folder; runs are kept in lightning_logs/ of the folder you train from"
        )
    records = [read_run(folder, root) for folder in find_run_folders(root)]
    if is_run_folder(root):  # a run's own folder (lightning_logs/sgd_0): that run too
        whole = Path(os.path.abspath(root))  # sgd_0/. is named sgd_0
        records.append(read_run(whole, whole.parent))
    return sorted(records, key=lambda r: (r.best_val_acc is None, -(r.best_val_acc or 0), r.name))


def differing(records: list[RunRecord]) -> list[str]:
    """The settings that two runs hold different values of (in config order). One that only
    some runs have (SGD's momentum beside Adam) counts where they disagree: ``optimizer``
    already tells those runs apart."""
    keys: dict[str, None] = {}
    for record in records:
        keys.update(dict.fromkeys(record.settings))
    return [k for k in keys if len({r.settings[k] for r in records if k in r.settings}) > 1]


def apart(records: list[RunRecord], keys: list[str]) -> dict[str, list[str]]:
    """For each run, its ``key=value`` of the differing settings where it is not with the
    majority (all of them where there is none): what sets this run apart, short enough for a
    terminal. Keys are their last part (``lr``) unless two would read the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    label = {k: s if last.count(s) == 1 else k for k, s in zip(keys, last, strict=True)}
    shown: dict[str, list[str]] = {r.name: [] for r in records}
    for key in keys:
        values = Counter(r.settings[key] for r in records if key in r.settings)
        (common, count), *rest = values.most_common()
        majority = common if not rest or rest[0][1] < count else None
        for record in records:
            value = record.settings.get(key)
            if value is not None and value != majority:
                shown[record.name].append(f"{label[key]}={value}")
    return shown


def row(record: RunRecord, differs: list[str]) -> dict[str, str]:
    """A record as the table's text, column by column."""
    planned = "?" if record.planned_epochs is None else str(record.planned_epochs)
    state = record.state + (f" ({record.problem})" if record.problem else "")
    return {
        "run": record.name,
        "config": record.config or "-",
        "differs": " ".join(differs) or "-",
        "epochs": "-" if record.state == "evaluated" else f"{record.epochs_done}/{planned}",
        "best val/acc": _percent(record.best_val_acc),
        "epoch": "-" if record.best_epoch is None else str(record.best_epoch),
        "test/acc": _percent(record.test_acc),
        "time": _duration(record.wall_seconds),
        "state": state,
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def table(rows: list[dict[str, str]]) -> str:
    """Aligned text columns, numbers right-aligned."""
    right = {"epochs", "best val/acc", "epoch", "test/acc", "time"}
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in COLUMNS}
    lines = []
    for cells in [{c: c for c in COLUMNS}, *rows]:
        line = "  ".join(
            cells[c].rjust(widths[c]) if c in right else cells[c].ljust(widths[c]) for c in COLUMNS
        )
        lines.append(line.rstrip())
    return "\n".join(lines)


def _outcome(r: RunRecord) -> dict:
    """What a run reached and where it stands, as the numbers scripts read."""
    return {
        "epochs_done": r.epochs_done,
        "epochs_planned": r.planned_epochs,
        "best_val_acc": r.best_val_acc,
        "best_epoch": r.best_epoch,
        "test_acc": r.test_acc,
        "wall_seconds": round(r.wall_seconds, 1),
        "state": r.state,
    }


def as_json(records: list[RunRecord], keys: list[str]) -> str:
    return json.dumps(
        [
            {
                "run": r.name,
                "folder": str(r.folder),
                "config": r.config or None,
                "differs": {k: r.settings.get(k) for k in keys},
                "settings": r.settings,
                **_outcome(r),
                "problem": r.problem or None,
            }
            for r in records
        ],
        indent=2,
    )


def write_csv(records: list[RunRecord], keys: list[str]) -> None:
    fields = ["run", "config", *keys, *_outcome(RunRecord("", Path())), "problem"]
    writer = csv.DictWriter(sys.stdout, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in records:
        settings = {k: r.settings.get(k, "") for k in keys}
        writer.writerow(
            {"run": r.name, "config": r.config, **settings, **_outcome(r), "problem": r.problem}
        )


def _xy(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [x for x, _ in points], [y for _, y in points]


def plot(records: list[RunRecord], path: Path) -> None:
    """val/acc, and train and val loss, against epochs: one colour a run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise UserError(
            "--plot needs matplotlib: pip install matplotlib (make installs it)"
        ) from None
    drawn = [r for r in records if r.curves.get("val/acc")]
    if not drawn:
        raise UserError(f"--plot {path}: no run here has a val/acc to draw; nothing was written")
    figure, (accuracy, loss) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    # one colour a run: ten distinct ones, twenty beyond (paired shades)
    colours = plt.get_cmap("tab10" if len(drawn) <= 10 else "tab20").colors
    for index, record in enumerate(drawn):
        colour = colours[index % len(colours)]
        # the epoch's plain cross-entropy, which compares with val/loss; a run from before it
        # has train/loss, and its label says so
        train = "train/cross_entropy" if record.curves.get("train/cross_entropy") else "train/loss"
        older = train == "train/loss" and record.curves.get(train)
        label = f"{record.name} (dotted: train/loss)" if older else record.name
        accuracy.plot(*_xy(record.curves["val/acc"]), color=colour, marker=".", label=label)
        if record.curves.get("val/loss"):
            loss.plot(*_xy(record.curves["val/loss"]), color=colour, marker=".")
        if record.curves.get(train):
            loss.plot(
                *_xy(record.curves[train]),
                color=colour,
                linestyle=":",
                alpha=0.7,
            )
    accuracy.set(title="val/acc at each validation", xlabel="epoch", ylabel="accuracy")
    loss.set(
        title="val/loss (solid): cross-entropy, weights validated\n"
        "train/cross_entropy (dotted): of the epoch's training batches\n"
        "(older runs: train/loss, the loss optimized, as logged)",
        xlabel="epoch",
        ylabel="loss",
    )
    for axes in (accuracy, loss):
        axes.grid(alpha=0.3)
    if drawn:  # the runs once, beside both charts: it stays readable with many runs
        columns = 1 + len(drawn) // 26
        figure.legend(loc="outside right upper", fontsize=8, ncols=columns)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    except (OSError, ValueError) as err:
        raise UserError(f"--plot {path}: cannot write it ({err})") from None
    finally:
        plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    """The ``runs`` command; errors are one line, as the other commands'."""
    args = parse_args(sys.argv[2:] if argv is None else argv)
    try:
        records = collect(args.root)
        keys = differing(records)
        if args.json:
            print(as_json(records, keys))
        elif args.csv:
            write_csv(records, keys)
        elif records:
            shown = apart(records, keys)
            print(table([row(r, shown[r.name]) for r in records]))
        else:
            print(f"no runs in {args.root}")
        if args.plot is not None:
            plot(records, args.plot)
            print(f"plot: {args.plot}", file=sys.stderr)
    except UserError as err:
        exit_with(err)
