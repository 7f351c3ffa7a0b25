"""``python -m fashion_lightning runs``: the runs under a folder, one row each, best first.

    python -m fashion_lightning runs                        # lightning_logs/, as a table
    python -m fashion_lightning runs --root elsewhere --csv  # or --json, for scripts
    python -m fashion_lightning runs --plot runs.png        # val/acc and the losses per epoch

A row: the run's folder, its config, the settings that differ between the runs listed, the
epochs done and planned, the best ``val/acc`` and its epoch, the accuracy on training images
at the last validation and its gap to ``val/acc`` there (``train_eval/*``), ``test/acc``,
the wall time and whether it finished, was stopped (``--ckpt_path last`` continues it), still
runs or failed.
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
from fashion_lightning.runs_plot import plot

PROG = "python -m fashion_lightning runs"
# the settings that set a run apart come last: they are as long as they are many
COLUMNS = (
    "run",
    "config",
    "epochs",
    "best val/acc",
    "epoch",
    "last train",
    "gap (pt)",
    "test/acc",
    "time",
    "state",
    "differs",
)


def parse_args(argv: list[str]):
    # the installed command says its own name (fashion-lightning runs)
    installed = os.path.basename(sys.argv[0]) == "fashion-lightning"
    prog = "fashion-lightning runs" if installed else PROG
    parser = OneLineErrorParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("lightning_logs"),
        help="where the runs are (lightning_logs), or one run's own folder",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw train and val accuracy and loss, and their gap, per epoch",
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
        "last train": _percent(record.train_acc),
        "gap (pt)": "-" if record.gap is None else f"{100 * record.gap:+.2f}",
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
    right = {"epochs", "best val/acc", "epoch", "last train", "gap (pt)", "test/acc", "time"}
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
        "last_train_acc": r.train_acc,
        "last_gap": r.gap,
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
    except BrokenPipeError:  # `runs --json | head`: the reader has what it wanted
        # (Python's advice: point stdout at devnull, so that the flush at exit cannot fail)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
