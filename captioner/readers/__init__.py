"""Caption-file readers, one module per format, and the detection of a file's format.

Each format module has `FORMAT` (its name), `looks_like(source) -> bool` (judged from content,
never from the file name) and `read(source, builder)`; `read_corpus` reads files of any of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from captioner.corpus import Corpus
from captioner.errors import CaptionerError
from captioner.progress import ShowProgress
from captioner.progress import bar as progress_bar
from captioner.readers import coco, flickr8k, kaggle, karpathy, table
from captioner.readers.builder import CorpusBuilder
from captioner.readers.source import Source
from captioner.readers.splits import resolve_splits

# In detection order: a Kaggle header is also a valid CSV header, so Kaggle comes first.
_MODULES = (kaggle, table, flickr8k, karpathy, coco)
READERS = {module.FORMAT: module for module in _MODULES}
FORMATS = tuple(READERS)


def detect_format(source: Source) -> str:
    for module in _MODULES:
        if module.looks_like(source):
            return module.FORMAT
    if source.looks_like_json:
        raise CaptionerError(
            f"{source.path}: wrong JSON shape: expected Karpathy's images[].sentences or "
            "MS-COCO's images + annotations"
        )
    number, line = source.first_line()
    raise CaptionerError(
        f"{source.path}:{number}: cannot tell the caption format from {line[:60]!r}: expected a "
        "header 'image,caption[,split]' (CSV/TSV), 'IMAGE.jpg#N<TAB>caption' lines (Flickr8k) "
        "or JSON (Karpathy, MS-COCO); or give the format"
    )


def read_corpus(
    paths: Sequence[Path] | Path,
    format: str | None = None,
    splits_dir: Path | None = None,
    keep_restval: bool = False,
    progress: ShowProgress = False,
) -> Corpus:
    """Read caption files of one format (detected from their content unless `format` is given).

    Formats: "kaggle", "flickr8k", "karpathy", "coco", "csv" (see captioner/readers/). Splits come
    from the split files in `splits_dir` when given; else from the caption file itself; else from
    Flickr8k split files found next to the first caption file; else from a hash of the image id
    (train 80 / val 10 / test 10). Karpathy's "restval" becomes "train" unless `keep_restval`.
    Bad input raises CaptionerError naming the file and line; lines that cannot be read but do
    not make the whole file doubtful are skipped and listed in `Corpus.skipped`.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    paths = list(dict.fromkeys(Path(p) for p in paths))
    if not paths:
        raise CaptionerError("no caption file given")
    if format is not None and format not in READERS:
        raise CaptionerError(f"unknown caption format {format!r}; one of: {', '.join(FORMATS)}")
    sources = [Source.load(path) for path in paths]
    found = format or detect_format(sources[0])
    for source in sources[1:]:
        other = format or detect_format(source)
        if other != found:
            raise CaptionerError(
                f"{source.path}: is {other} but {sources[0].path} is {found}; "
                "give files of one format"
            )
    # (the phase ends once the corpus is checked: a file found wrong ends it in one line)
    with progress_bar(progress, "reading captions", unit="cap") as display:
        builder = CorpusBuilder(on_caption=display.update)
        for source in sources:
            READERS[found].read(source, builder)
        splits, rule = resolve_splits(builder, splits_dir, paths[0], keep_restval)
        return builder.build(found, [str(p) for p in paths], splits, rule)
