"""Screenshots of TensorBoard over real runs, for the README.

    for c in sgd adam rmsprop; do
        python -m fashion_lightning fit --config configs/$c.yaml --trainer.default_root_dir shots/$c
    done
    python scripts/tensorboard_screenshot.py --logdir shots
    # -> docs/tensorboard-scalars.png, docs/tensorboard-hparams.png, docs/tensorboard-images.png

Starts a real TensorBoard server on 127.0.0.1 over the runs and photographs three of its
pages with headless Chromium (Debian's ``chromium`` package: ``apt-get install -y chromium``):
the Custom Scalars layout (train and val loss and accuracy on shared charts), the HParams
table, and the Images at their normal card size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from headless import free_port, photograph, server

ROOT = Path(__file__).resolve().parents[1]
# (file name, TensorBoard page, window width,height)
PAGES = (
    ("scalars", "#custom_scalars", "1400,900"),
    ("hparams", "#hparams", "1900,420"),
    ("images", "#images", "1400,1100"),
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
