"""``runs --plot``: the runs' curves against epochs, train next to val and their gap, one colour
a config (the colours TensorBoard's Time Series gives the configs with the link that
``make tensorboard`` prints)."""

from __future__ import annotations

import re
from pathlib import Path

from fashion_lightning.board import CONFIG_OF_RUN
from fashion_lightning.errors import UserError
from fashion_lightning.run_records import RunRecord

# TensorBoard 2.21's palette for runs (Time Series, HParams), in its order
TENSORBOARD_COLOURS = (
    "#425066",  # slate
    "#12b5cb",  # cyan
    "#e52592",  # pink
    "#f9ab00",  # yellow
    "#9334e6",  # purple
    "#7cb342",  # light green
    "#e8710a",  # orange
)
LINE_STYLES = ("-", "--", ":", "-.")  # the runs of one config, in the order they started
SAME_WEIGHTS = "training images evaluated as val's, same weights"
# (tag, title) of each chart, row by row: accuracy, then loss
CHARTS = (
    ("val/acc", "val accuracy"),
    ("train_eval/acc", f"train accuracy\n({SAME_WEIGHTS})"),
    (
        "train_eval/acc_gap",
        "gap: train minus val accuracy\n(flat near 0: generalises; climbing: overfits)",
    ),
    ("val/loss", "val loss (cross-entropy)"),
    ("train_eval/loss", f"train loss (cross-entropy,\n{SAME_WEIGHTS})"),
    ("train_eval/loss_gap", "gap: val minus train loss\n(climbing: overfits)"),
)


def group_of(name: str) -> str:
    """The config a run belongs to, as the link's regex groups it in TensorBoard (``sgd`` for
    sgd_0 and sgd_1); a name without a number is a group of its own."""
    found = re.match(CONFIG_OF_RUN, name)
    return found[1] if found else name


def run_styles(records: list[RunRecord]) -> dict[str, tuple[str, str]]:
    """(colour, line style) of each run: a colour a config, given in the order the configs'
    first runs started, as TensorBoard orders its runs and gives its colours (it cycles past
    seven); a line style a run of the config."""
    colours: dict[str, str] = {}
    runs_of: dict[str, int] = {}
    styles = {}
    for record in sorted(records, key=lambda r: (r.started, r.name)):
        group = group_of(record.name)
        colour = colours.setdefault(group, TENSORBOARD_COLOURS[len(colours) % 7])
        index = runs_of[group] = runs_of.get(group, -1) + 1
        styles[record.name] = (colour, LINE_STYLES[index % len(LINE_STYLES)])
    return styles


def plot(records: list[RunRecord], path: Path) -> None:
    """Accuracy and loss against epochs: val, train (the same weights) and their gap."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ModuleNotFoundError:
        raise UserError(
            "--plot needs matplotlib: pip install matplotlib (make installs it)"
        ) from None
    drawn = [r for r in records if r.curves.get("val/acc")]
    if not drawn:
        raise UserError(f"--plot {path}: no run here has a val/acc to draw; nothing was written")
    figure, grid = plt.subplots(2, 3, figsize=(15, 8), layout="constrained")
    styles = run_styles(drawn)
    for axes, (tag, title) in zip(grid.flat, CHARTS, strict=True):
        for record in drawn:
            points = record.curves.get(tag) or []
            colour, style = styles[record.name]
            axes.plot(
                [x for x, _ in points],
                [y for _, y in points],
                color=colour,
                linestyle=style,
                marker=".",
                label=record.name,
            )
        axes.set(title=title, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if tag.endswith("_gap"):
            axes.axhline(0, color="black", linewidth=0.8)
    # the same scale for train and val: the lines compare across the charts of a row
    for row in grid:
        low = min(axes.get_ylim()[0] for axes in row[:2])
        high = max(axes.get_ylim()[1] for axes in row[:2])
        for axes in row[:2]:
            axes.set_ylim(low, high)
    older = [r.name for r in drawn if not r.curves.get("train_eval/acc")]
    note = (
        f"\n(no train curves: {', '.join(older)}, run before they were measured)" if older else ""
    )
    figure.suptitle(f"train next to val, one colour a config{note}")
    columns = 1 + len(drawn) // 26  # the runs once, beside the charts
    handles, labels = grid.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize=8, ncols=columns)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    except (OSError, ValueError) as err:
        raise UserError(f"--plot {path}: cannot write it ({err})") from None
    finally:
        plt.close(figure)
