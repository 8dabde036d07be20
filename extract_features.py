"""Phase 1: frozen-CNN features of a caption dataset into a feature store (see `--help`)."""

from captioner.cli import script

if __name__ == "__main__":
    script("extract").main(prog_name="extract_features.py")
