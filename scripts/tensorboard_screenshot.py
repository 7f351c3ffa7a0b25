"""Screenshot of TensorBoard showing a run's scalars, for the README.

    python -m fashion_lightning fit --config configs/sgd.yaml     # or: make train
    python scripts/tensorboard_screenshot.py                      # -> docs/tensorboard.png

Starts a real TensorBoard server on 127.0.0.1 over the runs in ``lightning_logs/``
and photographs its Scalars page with headless Chromium (Debian's ``chromium``
package: ``apt-get install -y chromium``).
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
from urllib.parse import quote

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
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "tensorboard.png")
    parser.add_argument("--size", default="1600,750", help="window width,height")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("headless Chromium is needed: apt-get install -y chromium")

    if not any(args.logdir.glob("*/events.out.tfevents.*")):
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [
                    chromium,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={profile}",
                    f"--window-size={args.size}",
                    "--virtual-time-budget=20000",
                    f"--screenshot={args.out}",
                    url + "#scalars&tagFilter=" + quote("^(train|val|test)/"),
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{args.logdir} -> {args.out}")


if __name__ == "__main__":
    main()
