"""What the commands say and keep when the disk or the input is bad, each case a real process.

Builds a small dataset (16 pictures), extracts a store with the `tiny` CNN and trains a small
attention decoder for one epoch, then runs every case as `python -m captioner ...` and prints one
Markdown row per case: the case, the command, the last line it printed, its exit status and what
was kept. The full and read-only disks are real: small tmpfs mounts (root only; without the right
to mount, those rows are left out and the script says so). Nothing is downloaded.

    sudo .venv/bin/python bench/faults.py
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from captioner.store import STATUS_DONE, FeatureStore  # noqa: E402

IMAGES = 16
TINY = ["--encoder", "tiny", "--weights", "none", "--image-size", "64"]
SMALL_DECODER = ["--embed-size", "16", "--hidden-size", "16", "--attention-size", "8"]
SMALL_DECODER += ["--min-count", "1", "--batch-size", "8", "--device", "cpu"]


def captioner(*arguments, cwd: Path, pick: str = "") -> tuple[int, str, float]:
    """Exit status, the last line printed (stdout or stderr; with `pick`, the last that starts
    so, progress bars included), and the seconds it took."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "captioner", *map(str, arguments)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    lines = [
        line.rsplit("\r", 1)[-1].strip()
        for line in (result.stdout + "\n" + result.stderr).splitlines()
    ]
    if pick:
        said = [line for line in lines if line.startswith(pick)]
    else:
        bars = ("extract:", "captioning", "verifying", "epoch ")
        said = [line for line in lines if line and not line.startswith(bars)]
    return result.returncode, said[-1] if said else "", seconds


def digest(path: Path) -> str:
    """A short digest of a file or of a folder's files (names and bytes)."""
    sha = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        sha.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        sha.update(file.read_bytes())
    return sha.hexdigest()[:12]


def make_dataset(root: Path) -> None:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rows = ["image,caption,split"]
    for number in range(IMAGES):
        split = "train" if number < 10 else "val" if number < 13 else "test"
        colour = (15 * number, 200 - 10 * number, 90)
        Image.new("RGB", (64, 64), colour).save(root / "images" / f"{number:02d}.jpg")
        rows += [f"{number:02d}.jpg,a shape of colour {number % 4},{split}"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")


class Tmpfs:
    """A small tmpfs at `path` (a real full or read-only disk); `available` is False where this
    process may not mount."""

    def __init__(self, path: Path, size: str, read_only: bool = False):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        )
        self.available = mounted.returncode == 0

    def leave_free(self, free_bytes: int) -> None:
        """Fill the disk with a file until `free_bytes` are left."""
        stats = os.statvfs(self.path)
        filler = stats.f_bavail * stats.f_frsize - free_bytes
        (self.path / ".filler").write_bytes(b"\0" * max(filler, 0))

    def free_everything(self) -> None:
        (self.path / ".filler").unlink(missing_ok=True)

    def used(self) -> int:
        stats = os.statvfs(self.path)
        return (stats.f_blocks - stats.f_bfree) * stats.f_frsize

    def unmount(self) -> None:
        if self.available:
            subprocess.run(["umount", str(self.path)], check=False)


def run_files(run: Path) -> str:
    names = sorted("events" if p.name.startswith("events.") else p.name for p in run.iterdir())
    return ", ".join(names)


def done_images(store: Path) -> str:
    try:
        status = FeatureStore.open(store).status()
    except Exception:
        return "no store"
    return f"{int((status == STATUS_DONE).sum())} of {len(status)} images done"


def main() -> None:
    rows: list[tuple[str, str, str, int, str]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_dataset(root)
        extract_defaults = ["extract", "--captions", "captions.csv", "--images", "images", *TINY]
        layout = ["--images-per-shard", "1", "--dtype", "float32", "--compression", "none"]
        extract = [*extract_defaults, *layout]
        assert captioner(*extract, "--out", "s.zarr", cwd=root)[0] == 0
        train = ["train", "--features", "s.zarr", *SMALL_DECODER]
        assert captioner(*train, "--out", "runs/a", "--epochs", "1", cwd=root)[0] == 0

        def case(name: str, arguments: list, kept: Callable[[], str], pick: str = "") -> None:
            code, said, seconds = captioner(*arguments, cwd=root, pick=pick)
            command = "captioner " + " ".join(map(str, arguments))
            rows.append((name, command, said, code, f"{kept()} ({seconds:.1f} s)"))

        # ---- real disks: full and read-only ----
        full = Tmpfs(root / "full", "4m")
        read_only = Tmpfs(root / "ro", "1m", read_only=True)
        if full.available and read_only.available:
            empty_store = full.used()
            assert captioner(*extract, "--out", "full/f.zarr", cwd=root)[0] == 0
            whole_store = full.used() - empty_store
            shutil.rmtree(root / "full" / "f.zarr")
            # room for the empty store and about half the shards
            full.leave_free(whole_store // 2)
            case(
                "full disk (ENOSPC) mid-extraction",
                [*extract, "--out", "full/f.zarr"],
                lambda: done_images(root / "full" / "f.zarr"),
            )
            full.free_everything()
            case(
                "... the same command after freeing space",
                [*extract, "--out", "full/f.zarr"],
                lambda: done_images(root / "full" / "f.zarr"),
            )
            full.leave_free(24 * 1024)
            case(
                "full disk (ENOSPC) writing the first checkpoint",
                [*train, "--out", "full/run", "--epochs", "1"],
                lambda: run_files(root / "full" / "run"),
            )
            full.free_everything()
            case(
                "... the same command with --resume after freeing space",
                [*train, "--out", "full/run", "--epochs", "1", "--resume"],
                lambda: run_files(root / "full" / "run"),
                pick="no ",
            )
            full.leave_free(4 * 1024)  # the model record fits, the captions file does not
            into_full = ["caption", "images", "--checkpoint", "runs/a/best.pt", "--out"]
            into_full += ["full/c.csv", "--workers", "0", "--device", "cpu"]

            def caption_rows() -> str:
                lines = (root / "full" / "c.csv").read_text().splitlines()
                return f"{max(len(lines) - 1, 0)} rows" + ("" if lines else " (an empty file)")

            case("full disk (ENOSPC) starting the captions file", into_full, caption_rows)
            full.free_everything()
            case("... the same command after freeing space", into_full, caption_rows)
            case(
                "read-only disk (EROFS), evaluate --out",
                ["evaluate", "--checkpoint", "runs/a/best.pt", "--features", "s.zarr"]
                + ["--out", "ro/results", "--metrics", "nltk-fallback", "--device", "cpu"],
                lambda: "nothing decoded: refused before any work",
            )
            case(
                "read-only disk (EROFS), train --out",
                [*train, "--out", "ro/run"],
                lambda: "nothing trained: refused before any work",
            )
        else:
            notes.append("no tmpfs could be mounted (not root?): the real-disk rows are left out")
        full.unmount()
        read_only.unmount()

        # ---- unwritable places and bad inputs ----
        case(
            "a folder no one may write (/sys), caption --out",
            ["caption", "images", "--checkpoint", "runs/a/best.pt", "--out", "/sys/c.csv"],
            lambda: "nothing captioned",
        )
        (root / "notes.txt").write_text("a file")
        case(
            "--out below a regular file",
            ["score", "--predictions", "captions.csv", "--captions", "captions.csv"]
            + ["--out", "notes.txt/results"],
            lambda: "nothing scored",
        )
        caption = ["caption", "images", "--out", "c.csv", "--workers", "0", "--device", "cpu"]
        assert captioner(*caption, "--checkpoint", "runs/a/best.pt", cwd=root)[0] == 0
        assert (
            captioner(*train, "--out", "runs/b", "--epochs", "1", "--seed", "1", cwd=root)[0] == 0
        )
        before = digest(root / "c.csv")
        case(
            "caption into an output of another checkpoint, greedy",
            [*caption, "--checkpoint", "runs/b/best.pt", "--strategy", "greedy"],
            lambda: f"c.csv {'unchanged' if digest(root / 'c.csv') == before else 'CHANGED'}",
        )
        cut = (root / "runs/a/best.pt").read_bytes()
        (root / "cut.pt").write_bytes(cut[: len(cut) // 2])
        case(
            "truncated checkpoint",
            ["evaluate", "--checkpoint", "cut.pt", "--features", "s.zarr", "--out", "results"],
            lambda: "nothing written" if not (root / "results").exists() else "results/ made",
        )
        import zarr

        zarr.open_group(str(root / "other.zarr"), mode="w").attrs["by"] = "another tool"
        case("a Zarr group that is not a store", ["features", "info", "other.zarr"], lambda: "")
        store_before = digest(root / "s.zarr")
        case(
            "extract --out onto a store made otherwise",
            [*extract_defaults, "--out", "s.zarr"],  # other shards, dtype and compression
            lambda: (
                f"s.zarr {'unchanged' if digest(root / 's.zarr') == store_before else 'CHANGED'}"
            ),
        )

        # ---- what a newcomer reads ----
        code, usage, seconds = _script_usage(root)
        rows.append(("usage", "python train_decoder.py --help", usage, code, f"({seconds:.1f} s)"))
        case(
            "resume",
            [*train, "--out", "runs/a", "--epochs", "2", "--resume"],
            lambda: "epoch 2 trained",
            pick="resuming",
        )
        case("verify's progress bar", ["features", "verify", "s.zarr"], lambda: "", "verifying")
        case("verify's summary", ["features", "verify", "s.zarr"], lambda: "")
    print("| case | command | what it said | exit | kept |")
    print("|---|---|---|---:|---|")
    for name, command, said, code, kept in rows:
        said = said.replace("|", r"\|")  # (a progress bar's bar)
        print(f"| {name} | `{command}` | {said} | {code} | {kept} |")
    for note in notes:
        print(f"\n{note}")


def _script_usage(root: Path) -> tuple[int, str, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "train_decoder.py"), "--help"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    return result.returncode, result.stdout.splitlines()[0], time.perf_counter() - started


if __name__ == "__main__":
    main()
