import sys

if __name__ == "__main__":
    # what usage and error lines call the program, instead of "__main__.py"
    sys.argv[0] = "python -m fashion_lightning"
    if sys.argv[1:2] == ["runs"]:  # compares runs; reads files only, needs no Lightning
        from fashion_lightning.runs import main
    else:
        from fashion_lightning.cli import main
    main()
