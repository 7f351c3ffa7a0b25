"""Screenshot of optuna-dashboard over a real study, for the README.

    python -m fashion_lightning.tune --config configs/best.yaml \
        --search configs/search/mlp.yaml --trials 40 --study mlp
    python scripts/optuna_dashboard_screenshot.py lightning_logs/tune/mlp/study.journal
    # -> docs/optuna-dashboard.png

Starts optuna-dashboard on 127.0.0.1 over the study's storage (a journal file path or an
Optuna storage URL) and photographs the study's page with headless Chromium (Debian's
``chromium`` package: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import urllib.request
from pathlib import Path

from headless import free_port, photograph, server

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("storage", help="the study's journal file, or its storage URL")
    parser.add_argument("--study", help="the study's name (default: the storage's first)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "optuna-dashboard.png")
    parser.add_argument("--size", default="1500,1300", help="window width,height")
    args = parser.parse_args()
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    if dashboard is None:
        sys.exit("optuna-dashboard is needed: pip install 'fashion-lightning[tune]'")
    port = free_port()
    command = [dashboard, args.storage, "--host", "127.0.0.1", "--port", str(port)]
    with server(command, "api/studies", port) as url:
        with urllib.request.urlopen(url + "api/studies", timeout=30) as response:
            studies = json.load(response)["study_summaries"]
        chosen = [s for s in studies if args.study in (None, s["study_name"])]
        if not chosen:
            sys.exit(f"no study {args.study!r} in {args.storage}")
        photograph(f"{url}dashboard/studies/{chosen[0]['study_id']}", args.out, args.size)
    print(f"{args.storage} -> {args.out}")


if __name__ == "__main__":
    main()
