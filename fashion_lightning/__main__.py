"""``python -m fashion_lightning`` and the ``fashion-lightning`` command: ``runs`` compares the
runs (it reads files only and needs no Lightning), anything else is the Lightning CLI."""

import sys


def main() -> None:
    if sys.argv[1:2] == ["runs"]:
        from fashion_lightning.runs import main as command
    else:
        from fashion_lightning.cli import main as command
    command()


if __name__ == "__main__":
    # what usage and error lines call the program, instead of "__main__.py"
    sys.argv[0] = "python -m fashion_lightning"
    main()
