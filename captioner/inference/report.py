"""report.html: one page that shows an evaluation, or a captioned folder, to a person.

The page opens offline in any browser: its styles and script are inline, the card data is one
JSON block in the page, and the pictures are small JPEGs in a folder beside it
(``report_files/``: a thumbnail per image, and one strip per image with a panel per word of the
attention model). The script shows the cards a page at a time, so a 5,000-image split opens as
fast as a 50-image one, sorts them by a per-image score (worst first is how failure modes are
found) and filters them by word. Everything that comes from users (captions, ids, paths) is put
on the page as text, never as markup: the header is HTML-escaped here, the cards are built with
``textContent`` by the script, and the JSON block cannot end its script element early.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from captioner import visualize
from captioner.files import atomic_file
from captioner.images import ImageError, load_image
from captioner.metrics import METRICS, MetricsReport
from captioner.progress import ShowProgress
from captioner.progress import bar as progress_bar

REPORT_NAME = "report.html"
THUMBNAIL_SIDE = 192  # pixels, the longer side
PANEL_SIDE = 72  # one word's attention panel
JPEG_QUALITY = 80
# Pictures are decoded and shrunk in threads: Pillow releases the GIL while it decodes.
THREADS = min(8, os.cpu_count() or 1)


@dataclass
class Card:
    """One image on the page."""

    image: str  # its id: shown, and searched by the word filter
    caption: str  # the generated caption
    picture: Path | None = None  # the original file; None when it cannot be shown
    missing: str = ""  # why there is no picture, said on the card
    references: Sequence[str] = ()
    scores: dict[str, float] = field(default_factory=dict)  # per-image figures to sort by
    words: Sequence[str] = ()  # the caption's words, one per row of `attention`
    attention: np.ndarray | None = None  # (len(words), H*W) for an attention model
    note: str = ""  # anything else to say, e.g. why captioning it failed


@dataclass
class ReportPage:
    title: str
    cards: list[Card]
    details: list[tuple[str, str]]  # where the figures come from: (what, value)
    metrics: MetricsReport | None = None
    grid: tuple[int, int] | None = None  # the attention grid (H, W) of the cards' `attention`
    notes: list[str] = field(default_factory=list)


def write_report(path: Path, page: ReportPage, progress: ShowProgress = False) -> Path:
    """Write `page` to `path` (an .html file) and its pictures to ``<stem>_files/`` beside it."""
    path = Path(path)
    folder = path.with_name(f"{path.stem}_files")
    folder.mkdir(parents=True, exist_ok=True)

    def card_entry(numbered: tuple[int, Card]) -> dict:
        return _card_entry(numbered[0], numbered[1], page.grid, path.parent, folder)

    with (
        ThreadPoolExecutor(THREADS) as pool,
        progress_bar(progress, "report", len(page.cards), unit="img") as bar,
    ):
        entries = []
        for entry in pool.map(card_entry, enumerate(page.cards)):
            entries.append(entry)
            bar.update()
    data = json.dumps({"cards": entries, "scores": _score_names(page.cards)}, ensure_ascii=True)
    # Inside <script>, "</script" would end the element and "<!--" change how it is parsed; JSON
    # has "<" only inside strings, where "\u003c" reads as the same character.
    data = data.replace("<", "\\u003c")
    parts = {"title": html.escape(page.title), "header": _header(page), "data": data}
    template = files("captioner.inference").joinpath("report_page.html").read_text("utf-8")
    # One pass, so that nothing substituted is searched for placeholders again.
    text = re.sub(r"\{\{(title|header|data)\}\}", lambda match: parts[match[1]], template)
    with atomic_file(path, "w", encoding="utf-8") as file:
        file.write(text)
    return path


def describe_config(config: object) -> str:
    """A configuration dataclass's fields as one line for the page: "name value, ..."."""
    return ", ".join(f"{name} {value}" for name, value in asdict(config).items())


def _card_entry(
    number: int, card: Card, grid: tuple[int, int] | None, page_folder: Path, folder: Path
) -> dict:
    """The card's JSON entry; its thumbnail and attention strip written into `folder`."""
    entry: dict = {"id": card.image, "caption": card.caption, "refs": list(card.references)}
    entry["scores"] = card.scores
    if card.note:
        entry["note"] = card.note
    picture = None
    if card.picture is None:
        entry["missing"] = card.missing or "no picture"
    else:
        try:
            picture = load_image(card.picture)
        except ImageError as error:
            entry["missing"] = f"{card.picture.name}: {error}"
        else:
            thumbnail = visualize.shrunk(picture, THUMBNAIL_SIDE)
            entry["thumb"] = _save_jpeg(thumbnail, folder / f"t{number:05d}.jpg", page_folder)
            entry["size"] = thumbnail.size
            entry["link"] = _relative_url(card.picture, page_folder)
    if card.attention is not None and grid is not None and len(card.words):
        alphas = card.attention[: len(card.words)]  # a panel per word, none for <end>
        strip = visualize.attention_strip(alphas, grid, picture, PANEL_SIDE)
        entry["strip"] = _save_jpeg(strip, folder / f"a{number:05d}.jpg", page_folder)
        entry["panel"] = [strip.width // len(card.words), strip.height]
        entry["words"] = list(card.words)
    return entry


def _save_jpeg(picture: Image.Image, path: Path, page_folder: Path) -> str:
    with atomic_file(path) as file:
        picture.save(file, format="JPEG", quality=JPEG_QUALITY)
    return _relative_url(path, page_folder)


def _relative_url(path: Path, page_folder: Path) -> str:
    """`path` as a URL relative to the page: percent-encoded, so that no file name can read as
    a scheme ("javascript:") or break out of an attribute or url(...)."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(page_folder))
    return quote(Path(relative).as_posix(), safe="/")


def _score_names(cards: list[Card]) -> list[str]:
    names: dict[str, None] = {}
    for card in cards:
        names.update(dict.fromkeys(card.scores))
    return list(names)


def _header(page: ReportPage) -> str:
    """The metrics table, where they came from, and notes, as escaped HTML."""
    escape = html.escape
    parts = []
    if page.metrics is not None:
        report = page.metrics
        label = report.implementation + (", FALLBACK: not the published metrics" * report.fallback)
        rows = "".join(
            f"<tr><th>{escape(name)}</th><td>{_number(report.scores.get(name))}</td>"
            f"<td>{_number(report.scores.get(name), 100)}</td>"
            f"<td>{escape(report.sources.get(name, ''))}</td></tr>"
            for name in METRICS
        )
        per_image = "".join(
            f"<li>{escape(name)}: {escape(source)}</li>"
            for name, source in report.per_image_sources.items()
        )
        parts.append(
            f"<section><h2>Metrics: {escape(label)}, {report.images} images</h2>"
            '<table class="metrics"><tr><th>metric</th><th>score</th><th>x100</th>'
            f"<th>computed by</th></tr>{rows}</table>"
            + (f"<p>Per-image scores on the cards:</p><ul>{per_image}</ul>" if per_image else "")
            + "</section>"
        )
    details = "".join(
        f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>" for name, value in page.details
    )
    notes = [*(page.metrics.notes if page.metrics else []), *page.notes]
    items = "".join(f"<li>{escape(note)}</li>" for note in notes)
    parts.append(
        f'<section><h2>Where this comes from</h2><table class="details">{details}</table>'
        + (f'<ul class="notes">{items}</ul>' if items else "")
        + "</section>"
    )
    return '<div class="summary">' + "".join(parts) + "</div>"


def _number(value: float | None, scale: float = 1.0) -> str:
    if value is None:
        return "n/a"
    return f"{value * scale:.2f}" if scale != 1.0 else f"{value:.4f}"


def image_root(images: Path | None, recorded: str | None) -> tuple[Path | None, str]:
    """The folder pictures are read from (`images`, else the one recorded at extraction), or
    None and why there is none."""
    root = images or recorded
    if root is None:
        return None, "no image folder known (pass --images)"
    if not Path(root).is_dir():
        return None, f"{root}: image folder not reachable"
    return Path(root), ""
