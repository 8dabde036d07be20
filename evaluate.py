"""Evaluation: caption a feature store's split with a checkpoint and score it (see `--help`)."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]], prog_name="evaluate.py")
