"""Which split each image belongs to.

In order of precedence:
1. split files given explicitly (`splits_dir`) decide every image;
2. the split the caption file itself gives (Karpathy, a CSV `split` column);
3. Flickr8k-style split files found next to the first caption file, for the images still
   without one (`*trainImages.txt`, `*devImages.txt`, `*testImages.txt`, one image name a line);
   images they do not list are "unassigned";
4. a hash of the image id: the first 8 bytes of SHA-1(id) modulo 100 put an image in train
   (0-79), val (80-89) or test (90-99). It is the same on every machine and run, and adding or
   removing images never moves the others.

Karpathy's "restval" (COCO val2014 images outside his val/test) becomes "train" unless kept.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from captioner.corpus import RESTVAL, UNASSIGNED
from captioner.errors import CaptionerError
from captioner.readers.builder import CorpusBuilder
from captioner.readers.source import Source

HASH_PROPORTIONS = {"train": 80, "val": 10, "test": 10}  # percent
SPLIT_FILE_PATTERNS = {
    "train": "*trainImages.txt",
    "val": "*devImages.txt",
    "test": "*testImages.txt",
}


def hash_split(image_id: str) -> str:
    bucket = int.from_bytes(hashlib.sha1(image_id.encode("utf-8")).digest()[:8], "big") % 100
    for split, percent in HASH_PROPORTIONS.items():
        if bucket < percent:
            return split
        bucket -= percent
    raise AssertionError("HASH_PROPORTIONS must sum to 100")


def find_split_files(directory: Path) -> dict[str, Path]:
    """split -> file for the split files in `directory` (none found: an empty dict)."""
    found = {}
    for split, pattern in SPLIT_FILE_PATTERNS.items():
        matches = sorted(Path(directory).glob(pattern))
        if len(matches) > 1:
            names = ", ".join(m.name for m in matches)
            raise CaptionerError(f"{directory}: several {split} split files ({names})")
        if matches:
            found[split] = matches[0]
    return found


def read_split_files(files: dict[str, Path], builder: CorpusBuilder) -> dict[str, str]:
    """image name -> split. A name listed twice keeps its first split; the repeat is skipped."""
    split_of: dict[str, str] = {}
    for split, path in files.items():
        source = Source.load(path)
        for number, line in source.lines():
            name = line.strip()
            if not name:
                continue
            if name in split_of:
                builder.skip(path, number, "image listed in two split files")
            else:
                split_of[name] = split
    return split_of


def _from_split_files(
    files: dict[str, Path], builder: CorpusBuilder, splits: list[str | None], only_missing: bool
) -> list[str | None]:
    split_of = read_split_files(files, builder)
    known = set(builder.paths) | {Path(p).name for p in builder.paths}
    for name in [name for name in split_of if name not in known]:
        builder.skip(files[split_of[name]], 0, "split file lists an image without captions", name)
    return [
        own
        if only_missing and own is not None
        else split_of.get(path, split_of.get(Path(path).name, UNASSIGNED))
        for own, path in zip(splits, builder.paths, strict=True)
    ]


def _describe(files: dict[str, Path]) -> str:
    return "split files " + ", ".join(str(files[s]) for s in SPLIT_FILE_PATTERNS if s in files)


def resolve_splits(
    builder: CorpusBuilder, splits_dir: Path | None, first_source: Path, keep_restval: bool
) -> tuple[list[str], str]:
    """The split of every image in `builder`, and the rule that gave them, in words."""
    splits: list[str | None] = list(builder.splits)
    if splits_dir is not None:
        files = find_split_files(splits_dir)
        if not files:
            patterns = ", ".join(SPLIT_FILE_PATTERNS.values())
            raise CaptionerError(f"{splits_dir}: no split files ({patterns})")
        splits = _from_split_files(files, builder, splits, only_missing=False)
        rule = _describe(files)
    elif all(split is not None for split in splits):
        rule = "from the caption file"
    elif files := find_split_files(first_source.parent):
        splits = _from_split_files(files, builder, splits, only_missing=True)
        rule = _describe(files)
    else:
        splits = [split or hash_split(i) for split, i in zip(splits, builder.ids, strict=True)]
        proportions = " / ".join(f"{s} {p}" for s, p in HASH_PROPORTIONS.items())
        rule = f"hash of the image id ({proportions} %)"
    if not keep_restval:
        splits = ["train" if split == RESTVAL else split for split in splits]
    return [split or UNASSIGNED for split in splits], rule
