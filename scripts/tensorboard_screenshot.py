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
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [  # no sandbox as root; no background traffic on a closed network
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


# (file name, TensorBoard page, window width,height)
PAGES = (
    ("scalars", "#custom_scalars", "1400,900"),
    ("hparams", "#hparams", "1900,420"),
    ("images", "#images", "1400,1100"),
)


def photograph(chromium: str, url: str, out: Path, size: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size}",
                "--virtual-time-budget=20000",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"TensorBoard did not answer at {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, default=ROOT / "lightning_logs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNGs")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("headless Chromium is needed: apt-get install -y chromium")

    if not any(args.logdir.rglob("events.out.tfevents.*")):
        sys.exit(f"no TensorBoard run under {args.logdir}: train one first (make train)")
    port = free_port()
    tensorboard = [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir)]
    server = subprocess.Popen(
        [*tensorboard, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(url + "data/runs")
        args.out.mkdir(parents=True, exist_ok=True)
        for name, page, size in PAGES:
            photograph(chromium, url + page, args.out / f"tensorboard-{name}.png", size)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(
        f"{args.logdir} -> {', '.join(f'tensorboard-{name}.png' for name, _, _ in PAGES)} in {args.out}"
    )


if __name__ == "__main__":
    main()
