"""``make tensorboard`` (``python -m fashion_lightning.board``): TensorBoard over the runs, and
the links that open it on the project's views printed last.

TensorBoard's own last line is its bare address, which opens Time Series with smoothing 0.6
(a ten-epoch curve bends visibly late) and a colour a run. Nothing in a log folder changes
that: a view, the smoothing and the colouring are chosen by the address (or in the browser,
which keeps what was set there).

    python -m fashion_lightning.board                      # lightning_logs, port 6006
    python -m fashion_lightning.board --logdir elsewhere --port 6007   # any tensorboard flag
"""

from __future__ import annotations

import argparse
import sys
import time
from urllib.parse import quote

# TensorBoard 2.21 colours a group of runs alike with Time Series' "Color runs by regex", which
# the address can carry: sgd_0 and sgd_1 are the config sgd (as runs --plot colours them)
CONFIG_OF_RUN = r"^(.+)_\d+$"
# (address after the server's, what it shows)
VIEWS = (
    (
        "#custom_scalars&_smoothingWeight=0",
        "does it overfit? the gaps, then train next to val, against epochs",
    ),
    (
        f"?smoothing=0&runColorGroup={quote('regex:' + CONFIG_OF_RUN, safe=':')}#timeseries",
        "every curve, a colour a config",
    ),
)


def links(url: str) -> list[str]:
    """The project's views on a TensorBoard server at ``url`` (ending in ``/``)."""
    return [f"{url}{view}" for view, _ in VIEWS]


def main(argv: list[str] | None = None) -> None:
    from tensorboard import program

    parser = argparse.ArgumentParser(
        prog="python -m fashion_lightning.board",
        description=__doc__.split("\n\n")[0],
        epilog="Any other flag goes to tensorboard: --port 6007, --bind_all, --host ...",
    )
    parser.add_argument("--logdir", default="lightning_logs", help="the runs (lightning_logs)")
    args, tensorboard_flags = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", args.logdir, *tensorboard_flags])
    url = board.launch()  # serves from a thread; TensorBoard's blocking main would print last
    print(f"TensorBoard over {args.logdir} at {url} (Ctrl+C to stop); open:")
    for link, (_, shown) in zip(links(url), VIEWS, strict=True):
        print(f"  {link}\n      {shown}")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
