"""report.html: what evaluation and scoring put on the page, that it is safe with any caption,
and, where Debian's `chromium` is installed, that a real browser runs it and loads its pictures."""

from __future__ import annotations

import csv
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from factories import make_store, write_split_pictures
from inference_factories import make_checkpoint, report_data
from PIL import Image

from captioner.inference.evaluate import EvaluateConfig, evaluate
from captioner.inference.report import Card, ReportPage, write_report
from captioner.inference.score import ScoreConfig, score_predictions
from captioner.models.decode import DecodingConfig

FALLBACK = "nltk-fallback"
# min_length: an untrained decoder may end at once, and attention strips need words
DECODING = DecodingConfig(beam_size=2, min_length=1, max_length=6)
HOSTILE = '</script><script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> &amp;'
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory) -> Path:
    """An attention model's evaluation of a 6-image test split whose pictures are on disk."""
    folder = tmp_path_factory.mktemp("evaluation")
    store_path = make_store(folder / "s.zarr", images=24)
    checkpoint = make_checkpoint(folder / "best.pt", store_path)
    images = write_split_pictures(store_path, folder / "images")
    config = EvaluateConfig(
        checkpoint, store_path, folder / "out", decoding=DECODING, metrics=FALLBACK, images=images
    )
    evaluate(config)
    return folder / "out"


def read_captions(out: Path) -> list[dict]:
    with open(out / "captions.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_every_evaluated_image_gets_a_card_with_its_picture_scores_and_attention(evaluation):
    cards = report_data(evaluation / "report.html")["cards"]
    written = read_captions(evaluation)
    assert [(c["id"], c["caption"]) for c in cards] == [
        (row["image_id"], row["caption"]) for row in written
    ]
    assert [" | ".join(c["refs"]) for c in cards] == [row["references"] for row in written]
    for card in cards:
        assert set(card["scores"]) == {"CIDEr-D", "BLEU-4"}
        thumbnail = evaluation / unquote(card["thumb"])
        assert Image.open(thumbnail).format == "JPEG"
        original = (evaluation / unquote(card["link"])).resolve()
        assert original.name == card["id"] and original.is_file()
        strip = Image.open(evaluation / unquote(card["strip"]))
        assert card["words"] == card["caption"].split()
        assert strip.size == (card["panel"][0] * len(card["words"]), card["panel"][1])
    page = (evaluation / "report.html").read_text("utf-8")
    assert "checkpoint" in page and "s.zarr" in page and "beam_size 2" in page
    assert "nltk-fallback" in page and "NLTK BLEU-4 of the image alone" in page


def test_a_transformers_evaluation_draws_its_last_layers_attention_per_word(tmp_path, evaluation):
    """Its alpha (the last layer's cross-attention, averaged over heads) in the report's strips
    and the --visualize overlays, as the attention model's."""
    folder = evaluation.parent
    checkpoint = make_checkpoint(tmp_path / "transformer.pt", folder / "s.zarr", "transformer")
    config = EvaluateConfig(
        checkpoint,
        folder / "s.zarr",
        tmp_path / "out",
        decoding=DECODING,
        metrics=FALLBACK,
        images=folder / "images",
        visualize=2,
    )
    result = evaluate(config)
    assert result.figures == 2 and len(list((tmp_path / "out" / "attention").glob("*.png"))) == 2
    cards = report_data(tmp_path / "out" / "report.html")["cards"]
    for card in cards:
        strip = Image.open(tmp_path / "out" / unquote(card["strip"]))
        assert strip.size == (card["panel"][0] * len(card["words"]), card["panel"][1])
    assert [card["caption"] for card in cards] == [
        row["caption"] for row in read_captions(tmp_path / "out")
    ]


def test_without_the_image_folder_each_card_says_so_and_attention_is_drawn_on_the_grid(
    tmp_path, evaluation
):
    folder = evaluation.parent
    config = EvaluateConfig(
        folder / "best.pt",
        folder / "s.zarr",
        tmp_path / "out",
        decoding=DECODING,
        metrics=FALLBACK,
        images=tmp_path / "gone",
    )
    evaluate(config)
    cards = report_data(tmp_path / "out" / "report.html")["cards"]
    assert all("image folder not reachable" in card["missing"] for card in cards)
    assert all("thumb" not in card and "strip" in card for card in cards)


def score_hostile_predictions(folder: Path) -> Path:
    """`score` of a predictions file whose captions and ids are markup meant to run."""
    captions, predictions = folder / "captions.csv", folder / "predictions.csv"
    write_csv(
        captions,
        [["image", "caption", "split"]]
        + [
            [name, caption, "test"]
            for name in ("a.jpg", "b.jpg")
            for caption in ("a red circle", HOSTILE)
        ],
    )
    write_csv(predictions, [["image", "caption"], ["a.jpg", HOSTILE], ["b.jpg", "a red circle"]])
    images = folder / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (30, 30), (200, 0, 0)).save(images / name)
    config = ScoreConfig(predictions, [captions], folder / "out", metrics=FALLBACK, images=images)
    score_predictions(config)
    return folder / "out" / "report.html"


def write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows(rows)


def test_captions_that_are_markup_stay_text(tmp_path):
    page = score_hostile_predictions(tmp_path)
    text = page.read_text("utf-8")
    assert "<script>window.pwned" not in text and "<img src=x" not in text
    assert text.count("</script>") == 3  # the page's own: error handler, data, script
    cards = report_data(page)["cards"]
    assert cards[0]["caption"] == HOSTILE and HOSTILE in cards[1]["refs"]


class _Page(HTMLParser):
    """From a rendered DOM: the status element's attributes, and each card's id and caption."""

    def __init__(self) -> None:
        super().__init__()
        self.status: dict[str, str] = {}
        self.texts: dict[str, list[str]] = {"image-id": [], "caption": []}
        self.images: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if attributes.get("id") == "page-status":
            self.status = attributes
        if tag == "img":
            self.images.append(attributes.get("src", ""))
        if attributes.get("class") in self.texts:
            self._open = attributes["class"]
            self.texts[self._open].append("")

    def handle_data(self, data: str) -> None:
        if self._open:
            self.texts[self._open][-1] += data

    def handle_endtag(self, tag: str) -> None:
        self._open = None


def rendered(page: Path, view: str = "") -> _Page:
    """The page (with `view`, e.g. "#word=red", in its address) as headless Chromium leaves it
    once its script ran and its pictures loaded."""
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.resolve().as_uri() + view,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = _Page()
    parsed.feed(result.stdout)
    return parsed


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (headless browser)")
def test_a_browser_runs_the_page_loads_every_picture_and_shows_the_evaluations_captions(
    evaluation, tmp_path
):
    page = rendered(evaluation / "report.html")
    status = page.status
    assert status.get("data-ready") == "1", status
    assert status["data-errors"] == "0", status.get("data-messages")
    written = read_captions(evaluation)
    assert status["data-cards"] == status["data-images"] == str(len(written))
    assert status["data-loaded"] == str(len(written)) and status["data-failed"] == "0"
    shown = dict(zip(page.texts["image-id"], page.texts["caption"], strict=True))
    assert shown == {row["image_id"]: row["caption"] for row in written}

    hostile = rendered(score_hostile_predictions(tmp_path))
    assert hostile.status.get("data-ready") == "1" and hostile.status["data-errors"] == "0"
    assert HOSTILE in hostile.texts["caption"]
    assert "x" not in hostile.images and hostile.status["data-loaded"] == "2"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (headless browser)")
def test_a_large_page_opens_one_page_of_cards_worst_first(tmp_path):
    scores = [(index * 37) % 101 / 10 for index in range(130)]
    cards = [
        Card(f"img_{index}", f"caption {index}", missing="no picture", scores={"CIDEr-D": score})
        for index, score in enumerate(scores)
    ]
    page = rendered(write_report(tmp_path / "report.html", ReportPage("many", cards, [])))
    assert page.status["data-errors"] == "0" and page.status["data-cards"] == "60"
    worst = sorted(range(130), key=lambda index: (scores[index], index))[:60]
    assert page.texts["image-id"] == [f"img_{index}" for index in worst]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (headless browser)")
def test_the_view_in_the_address_filters_by_word_and_sorts(tmp_path):
    cards = [
        Card("a", "a red circle", missing="-", references=["a blue square"], scores={"s": 2.0}),
        Card("b", "two red stars", missing="-", scores={"s": 1.0}),
        Card("c", "a green circle", missing="-", references=["one red star"], scores={"s": 3.0}),
    ]
    page = write_report(tmp_path / "report.html", ReportPage("view", cards, []))
    shown = rendered(page, "#word=Red&sort=best:s")
    assert shown.status["data-errors"] == "0" and shown.texts["image-id"] == ["a", "b"]
    shown = rendered(page, "#word=red&references=1&sort=worst:s")
    assert shown.texts["image-id"] == ["b", "a", "c"]
