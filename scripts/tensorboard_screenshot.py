"""Screenshots of TensorBoard over real runs, for the README.

    for c in sgd adam rmsprop best; do
        python -m fashion_lightning fit --config configs/$c.yaml --trainer.max_epochs 5 \
            --trainer.default_root_dir shots
    done
    python scripts/tensorboard_screenshot.py --logdir shots/lightning_logs
    # -> docs/tensorboard-{scalars,timeseries,hparams,images}.png

Starts a real TensorBoard server on 127.0.0.1 over the runs and photographs four of its
pages with headless Chromium (Debian's ``chromium`` package: ``apt-get install -y chromium``)
in a 1280x800 window, a usual laptop's: the two views ``make tensorboard`` links to (Custom
Scalars: the gaps, then train next to val; Time Series, a colour a config), the HParams
table, and best.yaml's validation pictures at their normal card size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from headless import free_port, photograph, server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fashion_lightning.board import VIEWS  # noqa: E402 - this checkout's, not an installed one

CUSTOM_SCALARS, TIME_SERIES = (view for view, _ in VIEWS)
# (file name, TensorBoard page, window width,height)
PAGES = (
    # the pages `make tensorboard` links to: values as measured (no smoothing), a colour a
    # config in Time Series
    ("scalars", CUSTOM_SCALARS, "1280,800"),
    # forceSVG: the same charts drawn as SVG, at once; headless Chromium photographs the
    # off-screen canvas TensorBoard draws by default before it is drawn, now and then
    ("timeseries", TIME_SERIES.replace("?", "?forceSVG=true&", 1), "1280,800"),
    ("hparams", "#hparams", "1280,800"),
    # the Images tab opens on the test group: its own filters show the validation pictures
    ("images", "#images&tagFilter=val%2Fpredictions%7Cval%2Fconfusion&regexInput=best", "1280,800"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, default=ROOT / "lightning_logs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNGs")
    args = parser.parse_args()
    if not any(args.logdir.rglob("events.out.tfevents.*")):
        sys.exit(f"no TensorBoard run under {args.logdir}: train one first (make train)")
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir)]
    with server([*command, "--host", "127.0.0.1", "--port", str(port)], "data/runs", port) as url:
        for name, page, size in PAGES:
            photograph(url + page, args.out / f"tensorboard-{name}.png", size)
    names = ", ".join(f"tensorboard-{name}.png" for name, _, _ in PAGES)
    print(f"{args.logdir} -> {names} in {args.out}")


if __name__ == "__main__":
    main()
