"""Phase 1: frozen-CNN features of a caption dataset into a feature store (see `--help`)."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    main(["extract", *sys.argv[1:]], prog_name="extract_features.py")
