import sys

from fashion_lightning.cli import main

if __name__ == "__main__":
    # what usage and error lines call the program, instead of "__main__.py"
    sys.argv[0] = "python -m fashion_lightning"
    main()
