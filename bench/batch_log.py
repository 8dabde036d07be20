"""A batch log: the product's commands run as a batch scheduler runs them, output to a file.

Builds a synthetic dataset (`captioner synth`), then runs extraction (tiny encoder), one epoch of
training (the attention decoder at the demo's sizes) and evaluation as subprocesses whose stdout
and stderr go through a pipe into one log file, as under SLURM. Each line is timestamped as it is
read from the pipe. For each command it prints the carriage returns in its log (a progress bar's
frames; the goal is none) and the longest gap between two consecutive lines (the longest silence;
the goal is at most the progress interval, 30 s), with the line that ended it.

    python bench/batch_log.py [--images 5000] [--progress-interval 30] [--keep DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe_machine  # noqa: E402  (bench/machine.py)

from captioner.demo import DECODER_SETTINGS, DemoConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAPTIONER = [sys.executable, "-m", "captioner"]  # (run in REPO: this checkout's package)
MODEL = "show-attend-tell"  # at the demo's sizes, trained for one epoch
TRAIN_OPTIONS = [
    *("--model", MODEL, "--epochs", "1", "--min-count", "1"),
    *("--batch-size", str(DemoConfig.batch_size)),
    *(f"--{name.replace('_', '-')}={value}" for name, value in DECODER_SETTINGS[MODEL].items()),
]


def run_logged(command: list[str], log: Path) -> tuple[int, list[tuple[float, bytes]]]:
    """Run `command` with stdout and stderr into one pipe, writing what comes to `log` and
    keeping each line with the time it was read: (exit status, [(seconds, line)])."""
    lines: list[tuple[float, bytes]] = []
    started = time.perf_counter()
    with open(log, "wb") as file:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for line in process.stdout:  # (a line ends at \n: a bar's \r frames stay in one line)
            lines.append((time.perf_counter() - started, line))
            file.write(line)
            file.flush()  # (for whoever follows the log while it runs)
    return process.wait(), lines


def describe(name: str, status: int, lines: list[tuple[float, bytes]]) -> str:
    """One row of the summary: lines, carriage returns, seconds, the longest silence."""
    returns = sum(line.count(b"\r") for _, line in lines)
    times = [0.0] + [seconds for seconds, _ in lines]
    gap, index = max((times[i + 1] - times[i], i) for i in range(len(lines))) if lines else (0, 0)
    ended_by = lines[index][1].decode("utf-8", "replace").strip()[:70] if lines else ""
    return (
        f"{name:<9} exit {status}  {len(lines):4d} lines  {returns:4d} carriage returns"
        f"  {times[-1]:7.1f} s  longest silence {gap:5.1f} s (until {ended_by!r})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--progress-interval", type=float, default=30.0)
    parser.add_argument("--keep", type=Path, help="Write the data and logs here, and keep them.")
    args = parser.parse_args()
    print(describe_machine())
    with tempfile.TemporaryDirectory() as scratch:
        root = (args.keep or Path(scratch)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        data, store, run = root / "shapes", root / "shapes.zarr", root / "run"
        interval = ["--progress-interval", str(args.progress_interval)]
        commands = {
            "synth": ["synth", "--out", str(data), "--images", str(args.images)],
            "extract": [
                *("extract", "--captions", str(data / "dataset_shapes.json")),
                *("--images", str(data), "--out", str(store)),
                *("--encoder", "tiny", "--weights", "none", "--image-size", "96"),
            ],
            "train": ["train", "--features", str(store), "--out", str(run), *TRAIN_OPTIONS],
            "evaluate": [
                *("evaluate", "--checkpoint", str(run / "best.pt"), "--features", str(store)),
                *("--out", str(root / "results")),
            ],
        }
        print(
            f"{args.images} synthetic images; progress interval {args.progress_interval:g} s;"
            f" logs in {root}"
        )
        for name, arguments in commands.items():
            status, lines = run_logged([*CAPTIONER, *arguments, *interval], root / f"{name}.log")
            print(describe(name, status, lines), flush=True)
            if status != 0:
                print(b"".join(line for _, line in lines[-5:]).decode("utf-8", "replace"))
                break


if __name__ == "__main__":
    main()
