"""Evaluation: caption a feature store's split with a checkpoint and score it (see `--help`)."""

from captioner.cli import script

if __name__ == "__main__":
    script("evaluate").main(prog_name="evaluate.py")
